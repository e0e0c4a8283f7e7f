"""The exporter's own Redis subscription against what kombu really publishes, for every way a
cluster can be configured: fanout prefixes and patterns, a global key prefix, a unix socket,
TLS, an ACL user. The events come from Celery's own event dispatcher with the cluster's
settings, so a topic that differs from kombu's fails here."""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import subprocess
import sys
import uuid
from pathlib import Path

import kombu
import pytest
import redis
from celery import Celery
from kombu import Connection

from celery_obs.exporter.control import RedisBroadcaster
from celery_obs.exporter.redis_link import (
    BrokerUrlError,
    RedisSettings,
    settings_for,
    settings_for_url,
)

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


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6390/3",
        "redis://:secret@h/1",
        "redis://user%40corp:p%3Aw@h:7000/5",
        "rediss://h:6380/2",  # no ssl options: kombu's own default applies
        "rediss://u:p@h/0?ssl_cert_reqs=required&ssl_ca_certs=/ca.pem",
        "rediss://h/0?ssl_cert_reqs=none",
        "redis+socket:///run/redis.sock?virtual_host=4",
        "sentinel://s1:26379;sentinel://s2:26380",
        "sentinel://:pw@s1/2",
        "redis://a:6379/1;redis://b:6379/1",
        "REDIS://127.0.0.1:6390/3",  # kombu lower-cases the scheme
        "redis://h/0 ",  # kombu reads the database as int() does
        "redis://h/+1",
        "redis://[::1]:6390/2",
        "redis://user:@h/1",  # a user with an empty password
        "redis://h/2?foo=bar",  # a query key kombu does not know
        "amqp://guest:guest@h//",
        "memory://",
    ],
)
def test_settings_from_the_url_alone_are_kombus(url: str) -> None:
    # The exporter reads a Redis URL without building a kombu Connection (which would import
    # redis-py); whatever kombu version runs, both readings of the first server must agree
    # (the failover list's others: test_redis_own_links).
    options = {"master_name": "mymaster", "global_keyprefix": "g:"}
    try:
        theirs = settings_for(Connection(url, transport_options=options))
    except TypeError:  # kombu refuses the URL: so must we, clearly
        with pytest.raises(BrokerUrlError, match="an option kombu does not know"):
            settings_for_url(url, options)
        return
    ours = settings_for_url(url, options)
    assert (ours and dataclasses.replace(ours, fallbacks=())) == theirs


def test_the_exporter_on_redis_never_loads_redis_py_or_celery(redis_url: str) -> None:
    # Its events, queue lengths and broadcasts all go over its own links: kombu's Redis
    # transport, and redis-py with it (~10 MB resident), stay unloaded.
    client = redis.Redis.from_url(redis_url)
    client.rpush("obs_waiting", "m1", "m2")
    script = f"""
import sys, time
from celery_obs.exporter.config import ExporterConfig
from celery_obs.exporter.service import Exporter
exporter = Exporter(ExporterConfig(broker_url={redis_url!r}, queues=("obs_waiting",),
                                   listen_address="127.0.0.1:0"))
exporter.start()
deadline = time.monotonic() + 20
while not exporter.status.connected and time.monotonic() < deadline:
    time.sleep(0.05)
exporter.probe.probe_once()
print(exporter.status.connected, exporter.queue_lengths.snapshot())
exporter.control.broadcast_once()
print(sorted(m for m in sys.modules if m.partition(".")[0] == "redis"))
print("kombu.transport.redis" in sys.modules)
print(sorted(m for m in sys.modules if m.partition(".")[0] == "celery"))
"""
    settings = settings_for_url(redis_url, {})
    assert settings is not None
    listener = redis.Redis.from_url(redis_url).pubsub()
    listener.subscribe(*settings.control_channels)
    wait_for(lambda: listener.get_message(timeout=0.1), 10, "the subscription")
    try:
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
        ).stdout.splitlines()
        # Celery itself neither: its app machinery is ~5 MB more (transports.event_exchange).
        assert out == ["True ({'obs_waiting': 2}, 0)", "[]", "False", "[]"]
        heard = [wait_for(lambda: listener.get_message(timeout=0.1), 10) for _ in range(2)]
    finally:
        listener.close()
    methods = [json.loads(base64.b64decode(json.loads(m["data"])["body"]))["method"] for m in heard]
    assert methods == ["heartbeat", "enable_events"]


def test_a_broadcast_is_kombus_own() -> None:
    # What Celery's app.control.broadcast publishes, and what the exporter publishes, on each
    # cluster configuration: the same channel and the same envelope, but for per-message ids.
    server = RedisServer()
    try:
        for options in (
            {},
            {"global_keyprefix": "tenant-a:"},
            {"fanout_prefix": "custom."},
            {"fanout_prefix": False},
            {"fanout_patterns": False},
        ):
            url = server.url(3)
            listener = redis.Redis.from_url(url).pubsub()
            listener.psubscribe("*")
            heard = functools.partial(listener.get_message, timeout=0.1)
            wait_for(heard, 10, "the subscription")
            app = Celery(broker=url, set_as_current=False)
            app.conf.broker_transport_options = options
            app.control.broadcast("enable_events")
            app.close()
            settings = settings_for_url(url, options)
            assert settings is not None
            RedisBroadcaster(settings, clock=lambda: 1000.0).broadcast(["enable_events"])
            theirs, ours = (wait_for(heard, 10, "a broadcast") for _ in range(2))
            listener.close()
            assert ours["channel"] == theirs["channel"], options
            their_envelope, our_envelope = (json.loads(m["data"]) for m in (theirs, ours))
            assert our_envelope["headers"] == {"clock": 1, "expires": 1001.0}
            assert their_envelope["headers"].keys() == our_envelope["headers"].keys()
            for envelope in (their_envelope, our_envelope):
                del envelope["headers"], envelope["properties"]["delivery_tag"]
            assert our_envelope == their_envelope, options
    finally:
        server.close()
