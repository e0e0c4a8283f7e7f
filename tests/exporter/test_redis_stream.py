"""The Redis reader/processor pair on a socketpair: framing, backlog accounting, dead links."""

from __future__ import annotations

import socket
import threading

import pytest

from celery_obs.exporter import redis_stream
from celery_obs.exporter.redis_stream import (
    BacklogStats,
    RedisEventStream,
    StreamClosed,
    SubscriptionRefused,
)


def pmessage(payload: bytes) -> bytes:
    parts = [b"pmessage", b"/0.celeryev/*", b"/0.celeryev/task.sent", payload]
    return b"*4\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair()
    ours.settimeout(0.2)
    yield ours, theirs
    ours.close()
    theirs.close()


def test_frames_split_anywhere_arrive_whole_and_in_order(pair) -> None:
    ours, theirs = pair
    stats, got, stop = BacklogStats(), [], threading.Event()
    stream = RedisEventStream(ours, stats, max_backlog_bytes=1 << 20)
    wire = b"*3\r\n$10\r\npsubscribe\r\n$13\r\n/0.celeryev/*\r\n:1\r\n"
    wire += b"".join(pmessage(b"x" * n) for n in range(1, 300))

    def send() -> None:  # in a thread: the socket buffer is smaller than the wire
        for i in range(0, len(wire), 7):  # arbitrary fragmentation
            theirs.sendall(wire[i : i + 7])
        theirs.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()

    def on_payloads(payloads: list[bytes]) -> None:
        got.extend(len(payload) for payload in payloads)

    subscribed: list[bool] = []
    with pytest.raises(StreamClosed, match="closed by the server"):
        stream.run(on_payloads, stop, lambda: None, lambda: subscribed.append(True))
    sender.join(5)
    assert got == list(range(1, 300))
    assert subscribed == [True]
    assert stats.backlog_bytes == 0


def test_an_error_mid_stream_leaves_no_phantom_backlog(pair) -> None:
    ours, theirs = pair
    stats = BacklogStats()
    stream = RedisEventStream(ours, stats, max_backlog_bytes=1 << 20)
    theirs.sendall(b"".join(pmessage(b"e" * 100) for _ in range(50)))

    def on_payloads(payloads: list[bytes]) -> None:
        raise RuntimeError("processing failed")

    with pytest.raises(RuntimeError):
        stream.run(on_payloads, threading.Event(), lambda: None, lambda: None)
    # Chunks read but never processed left with the stream; the next reader starts at zero.
    assert stats.bytes_in > 0
    assert stats.backlog_bytes == 0


def test_a_silent_link_is_pinged_then_declared_dead(pair, monkeypatch) -> None:
    monkeypatch.setattr(redis_stream, "_PING_AFTER", 0.3)
    monkeypatch.setattr(redis_stream, "_DEAD_AFTER", 1.0)
    ours, theirs = pair
    stream = RedisEventStream(ours, BacklogStats(), max_backlog_bytes=1 << 20)
    with pytest.raises(StreamClosed, match="no reply from Redis"):
        stream.run(lambda payload: None, threading.Event(), lambda: None, lambda: None)
    theirs.settimeout(1)
    assert theirs.recv(100).startswith(b"*1\r\n$4\r\nPING\r\n")


def test_a_refused_subscription_is_an_error_not_silence(pair) -> None:
    # A Redis ACL without +psubscribe answers the subscription with -NOPERM and nothing else:
    # the stream must fail with Redis' reason, not sit "connected" and count nothing.
    ours, theirs = pair
    theirs.sendall(b"-NOPERM User obs has no permissions to access the '/0.celeryev/*' channel\r\n")
    subscribed: list[bool] = []
    stream = RedisEventStream(ours, BacklogStats(), max_backlog_bytes=1 << 20)
    with pytest.raises(SubscriptionRefused, match="Redis refused: NOPERM User obs"):
        stream.run(lambda p: None, threading.Event(), lambda: None, lambda: subscribed.append(1))
    assert subscribed == []
