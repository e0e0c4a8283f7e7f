"""The exporter's own Redis links (queue lengths, broadcasts) against private redis-servers:
failover lists, ACL users, a server that drops its clients, URLs kombu refuses, and the reply
reader itself."""

from __future__ import annotations

import base64
import json
import logging
import uuid
from typing import Any

import pytest
import redis
from kombu import Connection
from kombu.transport import redis as redis_transport
from test_redis_link import publish_heartbeat

from celery_obs.exporter.consumer import BrokerStatus
from celery_obs.exporter.control import RedisBroadcaster, WorkerControl
from celery_obs.exporter.queues import (
    FAILURES_BEFORE_SUSPEND,
    QueueLengths,
    QueueProbe,
    RedisLengthReader,
    length_reader,
)
from celery_obs.exporter.redis_link import (
    BrokerUrlError,
    ReplyError,
    _Replies,
    connect_any,
    settings_for_url,
)

from brokers import RedisServer
from support import free_port, run_exporter_cli, wait_for

SECRET = "Hunter2"


@pytest.fixture
def server():
    server = RedisServer()
    yield server
    server.close()


def settings(url: str):
    found = settings_for_url(url, {})
    assert found is not None
    return found


def subscriber(url: str, channels: list[str]) -> Any:
    listener = redis.Redis.from_url(url).pubsub()
    listener.subscribe(*channels)
    wait_for(lambda: listener.get_message(timeout=0.1), 10, "the subscription")
    return listener


def heard_methods(listener: Any, count: int) -> list[str]:
    methods = []
    for _ in range(count):
        message = wait_for(lambda: listener.get_message(timeout=0.1), 10, "a broadcast")
        body = json.loads(base64.b64decode(json.loads(message["data"])["body"]))
        methods.append(body["method"])
    return methods


def kombus_servers(url: str) -> list[dict[str, Any]]:
    """Where kombu's Redis transport connects for each server of a failover list, in the order
    it fails over: its own `switch()`, then its channel's connection parameters. (`_connparams`
    is kombu's private method; a channel is made without connecting, for this reading only.)"""
    connection = Connection(url)
    found = []
    for alternate in [None, *connection.alt[1:]]:
        if alternate is not None:
            connection.switch(alternate)
        channel = object.__new__(redis_transport.Channel)
        channel.connection = connection.transport
        params = channel._connparams()
        tls = params["connection_class"].__name__ == "SSLConnection"
        found.append(
            {
                **{key: params.get(key) for key in ("host", "port", "db", "username", "password")},
                "verify": params.get("ssl_cert_reqs") if tls else "plain",
            }
        )
    return found


def our_servers(url: str) -> list[dict[str, Any]]:
    first = settings(url)
    return [
        {
            "host": server.host,
            "port": server.port,
            "db": server.db,
            "username": server.username,
            "password": server.password,
            "verify": "plain" if server.tls is None else server.tls.get("ssl_cert_reqs"),
        }
        for server in (first, *first.fallbacks)
    ]


@pytest.mark.parametrize(
    "url",
    [
        "redis://a:6380/1;redis://b",  # the port and database carry over
        "redis://:pw@a:6380/1;b",  # a bare host name takes everything else
        "redis://a/1;redis://:pw@b:7000/2",  # each its own
        "rediss://:pw@a/0?ssl_cert_reqs=required;redis://:pw@b:7000/0",  # TLS carries over
        "rediss://a/0?ssl_cert_reqs=required;rediss://b/0",
        "redis://u:p@a/3;redis://v:q@b;redis://c:7001",
    ],
)
def test_a_failover_list_is_kombus(url: str) -> None:
    # Each server after the first inherits what its URL leaves out, as kombu's failover does:
    # reading each URL on its own once sent a password in cleartext to a `rediss://` list's
    # second server.
    assert our_servers(url) == kombus_servers(url)


def test_a_socket_fails_over_to_a_server() -> None:
    ours = settings("redis+socket:///run/a.sock?virtual_host=3;redis://b:7000/2;c")
    assert (ours.path, ours.db) == ("/run/a.sock", 3)
    assert [(s.host, s.port, s.db) for s in ours.fallbacks] == [("b", 7000, 2), ("c", 7000, 2)]


def test_a_failover_url_with_an_option_kombu_does_not_know_is_refused() -> None:
    with pytest.raises(BrokerUrlError, match="credential_provider is not supported"):
        settings_for_url("redis://a/0;redis://b/0?credential_provider=pkg.Provider", {})


def read_lengths(url: str, queues: list[str]) -> tuple[dict[str, int], dict[str, str]]:
    """One probe round over a link of its own, closed after."""
    reader = RedisLengthReader(settings(url))
    try:
        return reader.lengths(queues)
    finally:
        reader.close()


def test_the_probe_survives_the_server_dropping_its_clients(server: RedisServer) -> None:
    # A server's `timeout`, a proxy's idle cut or an admin's CLIENT KILL closes the probe's
    # idle link: the next probe reconnects at once instead of failing one round.
    admin = redis.Redis.from_url(server.url(2))
    admin.rpush("jobs", "a", "b", "c")
    reader = RedisLengthReader(settings(server.url(2)))
    try:
        assert reader.lengths(["jobs"]) == ({"jobs": 3}, {})
        killed = admin.client_kill_filter(_type="normal")  # every client but this one
        assert killed >= 1
        admin.rpush("jobs", "d")
        assert reader.lengths(["jobs"]) == ({"jobs": 4}, {})
    finally:
        reader.close()


def test_a_failover_list_reaches_the_server_that_answers(server: RedisServer) -> None:
    # kombu tries `redis://a;redis://b` in order; so do the probe and the broadcasts, each URL
    # with its own database.
    closed = free_port()
    url = f"redis://127.0.0.1:{closed}/0;{server.url(5)}"
    admin = redis.Redis.from_url(server.url(5))
    admin.rpush("jobs", "a", "b")
    admin.rpush("jobs\x06\x169", "urgent")  # a priority sub-list counts too
    assert read_lengths(url, ["jobs", "idle"]) == ({"jobs": 3, "idle": 0}, {})
    ours = settings(url)
    listener = subscriber(server.url(5), ours.fallbacks[0].control_channels)
    try:
        RedisBroadcaster(ours).broadcast(["heartbeat", "enable_events"])
        assert heard_methods(listener, 2) == ["heartbeat", "enable_events"]
    finally:
        listener.close()


def test_the_links_follow_the_event_stream_not_each_other(server: RedisServer) -> None:
    # Once the event stream (the leading link) is on the second server, the probe and the
    # broadcasts start there too, even after the first comes back: workers and the exporter
    # moved together, and a broadcast sent to the first would reach none of them. A probe that
    # reaches another server does not move the others.
    first_port = free_port()
    url = f"redis://127.0.0.1:{first_port}/0;{server.url(0)}"
    ours = settings(url)
    probe_link = RedisLengthReader(ours)  # reaches the second, but does not lead
    assert ours.failover.current == 0
    stream_link, reached = connect_any(ours, lead=True)  # as the event stream connects
    assert (reached.port, ours.failover.current) == (server.port, 1)
    first = RedisServer(port=first_port)
    try:
        listener = subscriber(server.url(0), ours.control_channels)
        try:
            RedisBroadcaster(ours).broadcast(["heartbeat"])
            assert heard_methods(listener, 1) == ["heartbeat"]
        finally:
            listener.close()
    finally:
        stream_link.close()
        probe_link.close()
        first.close()


def test_events_over_a_failover_list(server: RedisServer, start_exporter) -> None:
    # The event channel is named after the database of the server reached (`/5.celeryev`),
    # not the first URL's; when the first server comes back, the broadcasts stay with the
    # event stream on the second.
    first_port = free_port()
    url = f"redis://127.0.0.1:{first_port}/0;{server.url(5)}"
    exporter = start_exporter(url, "--enable-events-interval", "1")
    hostname = f"w-{uuid.uuid4().hex[:6]}@failover"

    def heard() -> bool:
        publish_heartbeat(server.url(5), {}, hostname)
        return exporter.scrape().value("celery_worker_up", hostname=hostname) == 1

    wait_for(heard, 30, "a heartbeat on the second server of the list")
    first = RedisServer(port=first_port)
    try:
        listener = subscriber(server.url(5), settings(url).fallbacks[0].control_channels)
        try:
            assert heard_methods(listener, 2) == ["heartbeat", "enable_events"]
        finally:
            listener.close()
    finally:
        first.close()


def test_an_acl_user_without_a_password(server: RedisServer) -> None:
    # `redis://probe@host`: redis-py sends AUTH probe "" for a `nopass` user; so do we.
    admin = redis.Redis.from_url(server.url())
    admin.execute_command("ACL", "SETUSER", "probe", "on", "nopass", "~*", "&*", "+@all")
    admin.execute_command("ACL", "SETUSER", "default", "off")
    url = f"redis://probe@127.0.0.1:{server.port}/1"
    redis.Redis.from_url(url).rpush("jobs", "a")
    assert read_lengths(url, ["jobs"]) == ({"jobs": 1}, {})


def test_an_acl_that_hides_some_keys_fails_those_queues_alone(server: RedisServer) -> None:
    admin = redis.Redis.from_url(server.url())
    admin.rpush("shared", "a")
    admin.rpush("private", "b")
    admin.execute_command("ACL", "SETUSER", "probe", "on", ">pw", "~shared*", "+@all")
    url = f"redis://probe:pw@127.0.0.1:{server.port}/0"
    lengths, failures = read_lengths(url, ["private", "shared"])
    assert lengths == {"shared": 1}
    assert list(failures) == ["private"]
    assert "NOPERM" in failures["private"]


def test_a_server_wide_refusal_fails_the_probe_not_each_queue(server: RedisServer) -> None:
    # Without LLEN (or while Redis loads its data, runs a long script, ...) every queue's reply
    # is an error: the probe fails as a whole and is retried, instead of each queue counting
    # towards an hour's suspension.
    admin = redis.Redis.from_url(server.url())
    # (A user name with "key" in it once passed for a refusal about one key.)
    admin.execute_command("ACL", "SETUSER", "keyreader", "on", ">pw", "~*", "+@all", "-llen")
    url = f"redis://keyreader:pw@127.0.0.1:{server.port}/0"
    cache = QueueLengths()
    probe = QueueProbe(length_reader(Connection, settings(url)), lambda: {"a", "b"}, cache, 60)
    try:
        reader = RedisLengthReader(settings(url))
        with pytest.raises(ConnectionError, match="Redis refused LLEN: NOPERM"):
            reader.lengths(["a"])
        reader.close()
        for _ in range(FAILURES_BEFORE_SUSPEND + 1):
            probe.probe_once()
        assert cache.snapshot() == ({}, FAILURES_BEFORE_SUSPEND + 1)
        admin.execute_command("ACL", "SETUSER", "keyreader", "+llen")
        probe.probe_once()
        assert cache.snapshot() == ({"a": 0, "b": 0}, FAILURES_BEFORE_SUSPEND + 1)
    finally:
        probe.stop()


def test_a_wrong_password_is_refused_without_showing_it(server: RedisServer) -> None:
    admin = redis.Redis.from_url(server.url())
    admin.execute_command("ACL", "SETUSER", "probe", "on", ">right", "~*", "+@all")
    with pytest.raises(ConnectionError) as caught:
        RedisLengthReader(settings(f"redis://probe:{SECRET}@127.0.0.1:{server.port}/0"))
    assert "Redis refused AUTH" in str(caught.value)
    assert SECRET not in str(caught.value)


def test_a_server_without_auth_does_not_echo_the_password() -> None:
    # Redis quotes the arguments of a command it does not know; for AUTH, the credentials.
    server = RedisServer("--rename-command", "AUTH", "")
    try:
        with pytest.raises(ConnectionError) as caught:
            RedisLengthReader(settings(f"redis://probe:{SECRET}@127.0.0.1:{server.port}/0"))
    finally:
        server.close()
    assert str(caught.value) == "Redis refused AUTH: ERR unknown command 'AUTH'"


def test_a_queue_name_redis_cannot_hold_fails_alone(server: RedisServer) -> None:
    redis.Redis.from_url(server.url()).rpush("jobs", "a")
    lengths, failures = read_lengths(server.url(), ["bad\udcff", "jobs"])
    assert lengths == {"jobs": 1}
    assert list(failures) == ["bad\udcff"]
    assert "not a valid Redis key" in failures["bad\udcff"]


@pytest.mark.parametrize(
    ("url", "why"),
    [
        (f"redis://:{SECRET};x@127.0.0.1:1/0", "write one in a password as %3B"),
        (f"redis://:{SECRET}@127.0.0.1:1/abc", "the database (the URL's path) must be a number"),
        (f"redis://:{SECRET}@127.0.0.1:1/0?virtual_host=7", "query string sets virtual_host"),
        (f"redis://127.0.0.1:1/0?password={SECRET}", "query string sets password"),
        (f"redis://u:{SECRET}/x@127.0.0.1:1/0", "must be written %2F"),
        (f"redis://u?{SECRET}=1@127.0.0.1:1/0", "a '?' in a password must be written %3F"),
    ],
)
def test_a_url_kombu_refuses_is_a_clear_error_without_the_password(url: str, why: str) -> None:
    with pytest.raises((TypeError, ValueError)):  # the reference: kombu refuses it too
        Connection(url).default_channel  # noqa: B018 - before it connects (nothing listens)
    with pytest.raises(BrokerUrlError) as caught:
        settings_for_url(url, {})
    assert why in str(caught.value)
    assert SECRET not in str(caught.value)
    result = run_exporter_cli("--broker-url", url, "--web.listen-address", "127.0.0.1:0")
    assert result.returncode == 2
    assert "celery-obs: invalid broker URL redis://" in result.stderr
    assert why in result.stderr
    assert SECRET not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("url", "why"),
    [
        # kombu would connect to 127.0.0.1:6379 without a password: not what anyone meant.
        (f"redis://:#{SECRET}@127.0.0.1:1/0", "write one in a password as %23"),
        (
            "redis://127.0.0.1:1/0?credential_provider=pkg.Provider",
            "credential_provider is not supported",
        ),
    ],
)
def test_urls_the_exporter_refuses_though_kombu_reads_them(url: str, why: str) -> None:
    with pytest.raises(BrokerUrlError, match=why) as caught:
        settings_for_url(url, {})
    assert SECRET not in str(caught.value)


class Chunks:
    """A socket that hands out the given bytes a few at a time, as TCP may."""

    def __init__(self, data: bytes, size: int) -> None:
        self._chunks = [data[i : i + size] for i in range(0, len(data), size)]

    def recv(self, _limit: int) -> bytes:
        return self._chunks.pop(0) if self._chunks else b""


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_the_reply_reader_reads_every_resp2_type_however_split(size: int) -> None:
    data = (
        b":42\r\n+OK\r\n-WRONGTYPE not a list\r\n$5\r\nhe\r\no\r\n$-1\r\n*-1\r\n*0\r\n"
        b"*2\r\n*2\r\n:1\r\n$0\r\n\r\n$1\r\nx\r\n"
    )
    replies = _Replies(Chunks(data, size))
    got = [replies.read() for _ in range(8)]
    assert got[:2] == [42, b"OK"]
    assert isinstance(got[2], ReplyError)
    assert str(got[2]) == "WRONGTYPE not a list"
    assert got[3:] == [b"he\r\no", None, None, [], [[1, b""], b"x"]]
    with pytest.raises(ConnectionError, match="closed the connection"):
        replies.read()


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 400 Bad Request\r\n",
        b":abc\r\n",
        b"$3\r\nabcXY",  # a bulk string without its CRLF
        b"*1\r\n" * 100 + b":1\r\n",  # deeper than any reply to our commands
    ],
)
def test_the_reply_reader_refuses_what_is_not_redis(data: bytes) -> None:
    with pytest.raises(ConnectionError, match="not a Redis reply"):
        _Replies(Chunks(data, 100)).read()


def test_a_failing_broadcast_and_probe_are_logged_once_and_counted(caplog) -> None:
    # A broker that is down fails every round; the log says so when it starts and when it ends,
    # the metrics count every round.
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    status = BrokerStatus()
    control = WorkerControl(
        lambda: Connection(url),
        enable_events=True,
        interval=60,
        redis=settings(url),
        status=status,
    )
    cache = QueueLengths()
    probe = QueueProbe(length_reader(Connection, settings(url)), lambda: {"jobs"}, cache, 60)
    caplog.set_level(logging.INFO, logger="celery_obs")
    for _ in range(3):
        control.broadcast_once()
        probe.probe_once()
    assert status.broadcast_errors == 3
    assert cache.snapshot() == ({}, 3)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert warnings[0].startswith(
        "broadcast of heartbeat and enable_events failed: ConnectionRefusedError"
    )
    assert warnings[1].startswith("queue length probe failed: ConnectionRefusedError")
    server = RedisServer(port=port)
    try:
        caplog.clear()
        control.broadcast_once()
        probe.probe_once()
        assert status.broadcast_errors == 3
        assert cache.snapshot() == ({"jobs": 0}, 3)
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO] == [
            "broadcast of heartbeat and enable_events works again after 3 failures",
            "queue length probe works again after 3 failures",
        ]
    finally:
        probe.stop()
        server.close()
