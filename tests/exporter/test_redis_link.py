"""The exporter's own Redis subscription against what kombu really publishes, for every way a
cluster can be configured: fanout prefixes and patterns, a global key prefix, a unix socket,
TLS, an ACL user. The events come from Celery's own event dispatcher with the cluster's
settings, so a topic that differs from kombu's fails here."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import kombu
import pytest
import redis
from celery import Celery

from celery_obs.exporter.redis_link import RedisSettings

from brokers import RedisServer
from support import wait_for

pytestmark = pytest.mark.broker


def publish_heartbeat(url: str, options: dict, hostname: str) -> None:
    """A worker-heartbeat as Celery's dispatcher sends it, with the cluster's options."""
    app = Celery(broker=url, set_as_current=False)
    app.conf.broker_transport_options = options
    with app.connection_for_write() as connection:
        dispatcher = app.events.Dispatcher(connection, hostname=hostname)
        dispatcher.send("worker-heartbeat", active=0, processed=0, freq=2.0)
        dispatcher.close()
    app.close()


def options_flags(options: dict) -> list[str]:
    return [
        flag
        for key, value in options.items()
        for flag in ("--broker-transport-option", f"{key}={json.dumps(value)}")
    ]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"global_keyprefix": "tenant-a:"},
        {"fanout_prefix": "custom."},
        {"fanout_prefix": False},
        {"fanout_patterns": False},
        {"global_keyprefix": "p:", "fanout_prefix": "x/"},
    ],
    ids=["defaults", "global-keyprefix", "custom-prefix", "no-prefix", "no-patterns", "both"],
)
def test_events_published_by_kombu_reach_the_exporter(
    redis_url: str, options: dict, start_exporter
) -> None:
    exporter = start_exporter(redis_url, "--no-enable-events", *options_flags(options))
    hostname = f"w-{uuid.uuid4().hex[:6]}@link"

    def heard() -> bool:
        publish_heartbeat(redis_url, options, hostname)
        return exporter.scrape().value("celery_worker_up", hostname=hostname) == 1

    wait_for(heard, 30, "a heartbeat published by Celery with the cluster's options")
    assert exporter.scrape().value("celery_exporter_event_reader_info", reader="redis-socket") == 1


KOMBU = tuple(int(part) for part in kombu.__version__.split(".")[:2])


@pytest.mark.skipif(
    KOMBU < (5, 4), reason="kombu 5.3 cannot publish over redis+socket (a kombu bug)"
)
def test_a_unix_socket(start_exporter) -> None:
    socket_path = Path(f"/tmp/celery-obs-{uuid.uuid4().hex[:8]}.sock")
    server = RedisServer("--unixsocket", str(socket_path), "--unixsocketperm", "700")
    try:
        url = f"redis+socket://{socket_path}"
        exporter = start_exporter(url, "--no-enable-events")
        hostname = f"unix-{uuid.uuid4().hex[:6]}@link"

        def heard() -> bool:
            publish_heartbeat(url, {}, hostname)
            return exporter.scrape().value("celery_worker_up", hostname=hostname) == 1

        wait_for(heard, 30, "a heartbeat over a unix socket")
    finally:
        server.close()
        socket_path.unlink(missing_ok=True)


def test_tls_and_an_acl_user(certificate: tuple[Path, Path], start_exporter) -> None:
    cert, key = certificate
    server = RedisServer(tls=(str(cert), str(key)))
    password = f"pw-{uuid.uuid4().hex}"
    try:
        admin = redis.Redis(
            host="127.0.0.1",
            port=server.port,
            ssl=True,
            ssl_ca_certs=str(cert),
            ssl_cert_reqs="required",
        )
        admin.acl_setuser(
            "obs",
            enabled=True,
            passwords=[f"+{password}"],
            keys=["*"],
            channels=["*"],
            commands=["+@all"],
        )
        url = (
            f"rediss://obs:{password}@127.0.0.1:{server.port}/0"
            f"?ssl_cert_reqs=required&ssl_ca_certs={cert}"
        )
        exporter = start_exporter(url, "--no-enable-events")
        hostname = f"tls-{uuid.uuid4().hex[:6]}@link"

        def heard() -> bool:
            publish_heartbeat(url, {}, hostname)
            return exporter.scrape().value("celery_worker_up", hostname=hostname) == 1

        wait_for(heard, 30, "a heartbeat over TLS as an ACL user")
        assert password not in exporter.output()
    finally:
        server.close()


def test_the_topics_are_kombus_for_every_option() -> None:
    assert RedisSettings(db=3).topics == ["/3.celeryev/*"]
    assert RedisSettings(options={"fanout_patterns": False}).topics == ["/0.celeryev"]
    assert RedisSettings(options={"fanout_prefix": False}).topics == ["celeryev/*"]
    assert RedisSettings(db=2, options={"global_keyprefix": "g:"}).topics == ["g:/2.celeryev/*"]
    # kombu < 5.4 never formatted the sentinel prefix: both are heard.
    assert RedisSettings(db=1, sentinels=(("h", 26379),)).topics == [
        "/1.celeryev/*",
        "/{db}.celeryev/*",
    ]
