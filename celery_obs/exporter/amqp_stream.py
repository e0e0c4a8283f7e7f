"""Read event deliveries straight off an AMQP 0-9-1 socket once py-amqp has set up the consumer.

py-amqp decodes every frame of every message in Python (method arguments, properties tables,
per-frame dispatch): about 100 us per event message, ten times what decoding and counting the
event costs. An event consumer needs three things from a delivery: that it is one, its
`content_type`, and its body. So once kombu and py-amqp have connected, declared the queue and
started `basic.consume`, this loop reads the socket itself and walks the frames:

    method   basic.deliver       -> a message starts
    header   body size, flags    -> content_type (the first property) if its flag is set
    body     bytes               -> until body size, then the message is complete

Deliveries are acknowledged once processed: after each pass over what one read brought, one
`basic.ack` with `multiple` for the last delivery handed on. With the channel's prefetch bounded,
a stalled link holds at most a prefetch of events in flight, and what was delivered but not yet
acknowledged is delivered again after a reconnect (the tracker recognises redeliveries).
A message whose declared body size is past `events.MAX_MESSAGE_BYTES` is not accumulated: its
frames are skipped, it is reported through `on_oversized` and acknowledged like any other.

Anything else that needs an answer (connection.close, channel.close, basic.cancel) ends the loop
with an error, and the consumer reconnects. The loop only stops between messages; the consumer then
lets the connection go without a goodbye (what was delivered and not acknowledged returns to the
queue). Heartbeats keep
working: reads and our acks are reported to py-amqp's counters and `heartbeat_check` still
sends ours.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from struct import Struct
from typing import Any

from kombu import Connection

from .events import MAX_MESSAGE_BYTES

_FRAME_HEADER = Struct(">BHI")  # type, channel, payload size
_METHOD = Struct(">HH")  # class id, method id
_CONTENT_HEADER = Struct(">HHQH")  # class id, weight, body size, property flags
_DELIVERY_TAG = Struct(">Q")
#: basic.ack: method frame on the channel, class 60 method 80, delivery tag, multiple=1.
_ACK = Struct(">BHIHHQBB")
_FRAME_END = 0xCE
_METHOD_FRAME, _HEADER_FRAME, _BODY_FRAME, _HEARTBEAT_FRAME = 1, 2, 3, 8
_BASIC_DELIVER = (60, 60)
#: Methods that need no answer from a consumer: consume-ok, qos-ok, connection.blocked/unblocked.
_IGNORED_METHODS = {(60, 21), (60, 11), (10, 60), (10, 61)}
_CONTENT_TYPE_FLAG = 0x8000
_RECV_SIZE = 256 << 10
#: As on Redis (redis_stream._TRICKLE): after a small read, let the kernel gather for 50 ms,
#: so a live stream costs a loop turn, a lock and an ack per 50 ms, not per message. The
#: prefetch window (2000 deliveries) is more than 50 ms of a stream whose reads are small: 2000
#: deliveries fill far more than _TRICKLE, and a full read never waits.
_TRICKLE = 64 << 10
_GATHER = 0.05


class AmqpStreamError(ConnectionError):
    """The broker sent something this reader does not handle; the consumer reconnects."""


class AmqpEventStream:
    def __init__(
        self, amqp_connection: Any, sock: socket.socket, pending: bytes, channel_id: int
    ) -> None:
        self._connection = amqp_connection
        self._sock = sock
        self._buffer = bytearray(pending)
        self._channel_id = channel_id

    def _ack(self, delivery_tag: int) -> None:
        """Acknowledge every delivery up to and including `delivery_tag`."""
        frame = _ACK.pack(_METHOD_FRAME, self._channel_id, 13, 60, 80, delivery_tag, 1, _FRAME_END)
        self._sock.sendall(frame)
        self._connection.bytes_sent += 1  # py-amqp's heartbeat check: data went out

    # One loop over every frame type: the hot path of every AMQP event, where a call per frame
    # would cost more than the frame. Its states are the three frame kinds of a delivery.
    def run(  # noqa: C901
        self,
        on_bodies: Callable[[list[tuple[bytes, str | None]]], None],
        stopping: threading.Event,
        on_idle: Callable[[], None],
        on_oversized: Callable[[int], None],
    ) -> None:
        """Deliver message bodies (with their content types), those of one read together,
        until `stopping` is set (between messages) or the broker errs."""
        buffer, sock, connection = self._buffer, self._sock, self._connection
        pos = 0
        body_size = -1  # -1: no message in progress
        body_parts: list[bytes] = []
        received = 0
        content_type: str | None = None
        delivery_tag = acked = 0
        while True:
            # Parse every complete frame in the buffer.
            handed = acked
            bodies: list[tuple[bytes, str | None]] = []
            while len(buffer) - pos >= 8:
                kind, _channel, size = _FRAME_HEADER.unpack_from(buffer, pos)
                end = pos + 7 + size
                if len(buffer) <= end:
                    break
                if buffer[end] != _FRAME_END:
                    raise AmqpStreamError("AMQP frame out of sync (no frame-end octet)")
                start, pos = pos + 7, end + 1
                if kind == _BODY_FRAME:
                    if body_size <= MAX_MESSAGE_BYTES:
                        body_parts.append(bytes(buffer[start:end]))
                    received += size
                elif kind == _HEADER_FRAME:
                    _, _, body_size, flags = _CONTENT_HEADER.unpack_from(buffer, start)
                    content_type = None
                    if flags & _CONTENT_TYPE_FLAG:
                        length = buffer[start + 14]
                        raw = buffer[start + 15 : start + 15 + length]
                        content_type = raw.decode("utf-8", "replace")
                elif kind == _METHOD_FRAME:
                    method = _METHOD.unpack_from(buffer, start)
                    if method == _BASIC_DELIVER:
                        # consumer-tag (shortstr), then the delivery tag
                        tag_at = start + 5 + buffer[start + 4]
                        (delivery_tag,) = _DELIVERY_TAG.unpack_from(buffer, tag_at)
                        body_parts, received, body_size = [], 0, -2  # header comes next
                    elif method not in _IGNORED_METHODS:
                        raise AmqpStreamError(f"broker sent AMQP method {method[0]}.{method[1]}")
                elif kind != _HEARTBEAT_FRAME:
                    raise AmqpStreamError(f"unexpected AMQP frame type {kind}")
                if body_size >= 0 and received >= body_size:
                    if body_size > MAX_MESSAGE_BYTES:
                        on_oversized(body_size)
                    else:
                        bodies.append((b"".join(body_parts), content_type))
                    body_size, body_parts, received = -1, [], 0
                    handed = delivery_tag
            if bodies:
                on_bodies(bodies)  # before the ack: what is acknowledged has been counted
            if pos:
                del buffer[:pos]
                pos = 0
            if handed > acked:
                self._ack(handed)
                acked = handed
            on_idle()
            if stopping.is_set() and body_size == -1:
                return  # between messages; the consumer lets the connection go
            try:
                chunk = sock.recv(_RECV_SIZE)
            except TimeoutError:
                continue
            if not chunk:
                raise AmqpStreamError("connection closed by the broker")
            buffer += chunk
            connection.bytes_recv += 1  # py-amqp's heartbeat check: data came in
            if len(chunk) < _TRICKLE:
                stopping.wait(_GATHER)


def open_stream(connection: Connection, channel_id: int) -> AmqpEventStream | None:
    """Take over reading from an AMQP connection whose consumer is set up; None if not AMQP.

    Only public py-amqp attributes are used: the connection's `transport.sock` and its
    `bytes_recv` / `bytes_sent` heartbeat counters. py-amqp reads frames with exact-size
    reads, so after `basic.consume-ok` nothing of the stream sits in its buffers: every
    delivery is still in the socket.
    """
    if connection.transport.driver_type != "amqp":
        return None
    amqp_connection = connection.connection
    transport = getattr(amqp_connection, "transport", None)
    sock = getattr(transport, "sock", None)
    if sock is None:
        return None
    return AmqpEventStream(amqp_connection, sock, b"", channel_id)
