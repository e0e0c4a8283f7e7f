"""Read Celery's event stream off a Redis pub/sub socket: drain first, process second.

On Redis, events are pub/sub messages and the server disconnects a subscriber whose output
buffer passes `client-output-buffer-limit pubsub` (32 MB hard, 8 MB for 60 s by default). So a
reader thread does nothing but `recv()` raw chunks into a bounded in-process backlog, and the
processing thread splits them into RESP frames (hiredis, in C) and decodes: the server-side
buffer stays near empty while processing catches up with a burst. When the backlog reaches
`max_backlog_bytes` the reader pauses, so the server's own buffer adds to ours before it would
cut us off; memory never grows past the bound. (Holding the backlog zlib-compressed was tried:
it shrinks 8x but halves how fast the reader absorbs a burst, and the server cut us off.)

The subscription is ours too (`redis_link`: connection, TLS, AUTH, sentinel, the channel
pattern from the transport options), so the same fast path runs with every kombu and redis-py
version we admit; no kombu internals are used.
"""

from __future__ import annotations

import contextlib
import logging
import queue as queue_module
import socket
import threading
import time
from collections.abc import Callable

from . import redis_link

log = logging.getLogger(__name__)

try:
    import hiredis

    HAVE_HIREDIS = True
except ImportError:  # pragma: no cover - hiredis is a dependency; this is for odd installs
    HAVE_HIREDIS = False

_RECV_SIZE = 4 << 20
_PING = b"*1\r\n$4\r\nPING\r\n"
#: Seconds of silence before we ask (workers heartbeat every 2 s, so a live cluster is rarely
#: this quiet), and of silence, pings included, before the link counts as dead: a stalled
#: server is reported within ~7 s.
_PING_AFTER = 2.0
_DEAD_AFTER = 7.0
_FEED_SIZE = 16 << 10
#: A read smaller than this is a trickle (a live cluster, not a burst): the reader then lets
#: the kernel gather more for _GATHER seconds before the next read. Each hand-off wakes both
#: threads; one per message cost more CPU than the messages themselves at a few thousand
#: events/s. Metrics are scraped every few seconds, so 50 ms later is as good as now, and a
#: burst never waits: its reads come back full. 50 ms, not 20: at 5k events/s offered it cost
#: ~10 % less CPU (bench/run.py live), the reads being fewer.
_TRICKLE = 64 << 10
_GATHER = 0.05


class StreamClosed(ConnectionError):
    """The Redis connection under the stream ended; the consumer reconnects."""


class SubscriptionRefused(ConnectionError):
    """Redis answered our subscription with an error (an ACL without +psubscribe, say)."""


class BacklogStats:
    """Bytes read off the socket (by the reader thread) and processed (by the consumer thread)."""

    def __init__(self) -> None:
        self.bytes_in = 0  # written by the reader thread only
        self.bytes_out = 0  # written by the processing thread only
        self.full_waits = 0  # times the reader paused because the backlog was full

    @property
    def backlog_bytes(self) -> int:
        return max(self.bytes_in - self.bytes_out, 0)


class RedisEventStream:
    def __init__(self, sock: socket.socket, stats: BacklogStats, max_backlog_bytes: int) -> None:
        self._sock = sock
        self._stats = stats
        self._max_backlog = max_backlog_bytes
        self._chunks: queue_module.SimpleQueue[bytes | None] = queue_module.SimpleQueue()
        self._closed_reason = "connection closed by the server"
        self._stopping = threading.Event()
        self._reader = threading.Thread(target=self._read, name="redis-reader", daemon=True)

    def run(
        self,
        on_payloads: Callable[[list[bytes]], None],
        stopping: threading.Event,
        on_idle: Callable[[], None],
        on_subscribed: Callable[[], None],
    ) -> None:
        """Process messages until `stopping` is set; raises StreamClosed when Redis goes away.

        `on_subscribed` is called once Redis confirms the subscription: until then nothing is
        being consumed. An error reply (Redis refusing what we asked) raises
        SubscriptionRefused with Redis' own words.
        """
        self._reader.start()
        parser = hiredis.Reader()
        chunks, stats = self._chunks, self._stats
        subscribed = False
        try:
            while not stopping.is_set():
                on_idle()
                try:
                    chunk = chunks.get(timeout=1.0)
                except queue_module.Empty:
                    continue
                if chunk is None:
                    raise StreamClosed(self._closed_reason)
                stats.bytes_out += len(chunk)
                # hiredis moves its unread buffer down after every reply: fed a 4 MB chunk at
                # once, that is a 4 MB memmove per event. Small slices keep it cheap.
                for offset in range(0, len(chunk), _FEED_SIZE):
                    parser.feed(chunk, offset, min(_FEED_SIZE, len(chunk) - offset))
                    payloads: list[bytes] = []
                    while (frame := parser.gets()) is not False:
                        # [b"pmessage", pattern, channel, payload] (RESP3 pushes are lists too)
                        if isinstance(frame, list) and len(frame) == 4 and frame[0] == b"pmessage":
                            payloads.append(frame[3])
                        elif isinstance(frame, list) and frame and frame[0] == b"psubscribe":
                            if not subscribed:
                                subscribed = True
                                on_subscribed()
                        elif isinstance(frame, Exception):  # hiredis' ReplyError: -ERR, -NOPERM
                            raise SubscriptionRefused(f"Redis refused: {frame}")
                    if payloads:  # a slice's messages in one hand-off: one lock, not one each
                        on_payloads(payloads)
        finally:
            self._stopping.set()
            self._reader.join(5)
            with contextlib.suppress(OSError):  # the subscription is ours alone: end it
                self._sock.close()
            # Chunks left unprocessed (a stop, or an error mid-stream) leave the backlog with
            # this stream: without this the next stream's reader would find it still "full".
            while True:
                try:
                    leftover = chunks.get_nowait()
                except queue_module.Empty:
                    break
                if leftover is not None:
                    stats.bytes_out += len(leftover)

    def _read(self) -> None:
        """Move bytes from the socket into the backlog as fast as they come, up to its bound."""
        sock, chunks, stats, limit = self._sock, self._chunks, self._stats, self._max_backlog
        buffer = bytearray(_RECV_SIZE)  # reused: no 1 MB allocation per read
        view = memoryview(buffer)
        paused = False
        last_data = pinged = time.monotonic()
        try:
            while not self._stopping.is_set():
                if stats.bytes_in - stats.bytes_out >= limit:
                    # Full: stop reading and let the server buffer the rest for a moment.
                    if not paused:
                        stats.full_waits += 1
                        paused = True
                    self._stopping.wait(0.005)
                    continue
                paused = False
                try:
                    size = sock.recv_into(buffer)
                except TimeoutError:
                    # Nothing written to a subscriber socket means a dead link goes unnoticed:
                    # after a quiet spell, PING (Redis answers even in subscribe mode), and give
                    # up on a server that stays silent.
                    now = time.monotonic()
                    if now - last_data > _DEAD_AFTER:
                        self._closed_reason = f"no reply from Redis for {now - last_data:.0f}s"
                        break
                    if now - max(last_data, pinged) > _PING_AFTER:
                        sock.sendall(_PING)
                        pinged = now
                    continue
                if not size:
                    break
                last_data = time.monotonic()
                stats.bytes_in += size
                chunks.put(bytes(view[:size]))
                if size < _TRICKLE:
                    self._stopping.wait(_GATHER)
        except OSError as exc:
            self._closed_reason = f"{type(exc).__name__}: {exc}"
        chunks.put(None)


def open_stream(
    settings: redis_link.RedisSettings,
    stats: BacklogStats,
    max_backlog_bytes: int,
    timeout: float = 10.0,
) -> RedisEventStream:
    """Connect and subscribe to the event channel ourselves."""
    sock, reached = redis_link.connect_any(settings, timeout=timeout, lead=True)
    try:
        redis_link.subscribe(sock, reached.topics)
    except BaseException:
        sock.close()
        raise
    sock.settimeout(1.0)
    return RedisEventStream(sock, stats, max_backlog_bytes)
