"""Own the broker connection and feed every event on the celeryev exchange to the tracker.

kombu directly, not celery's `Receiver`: messages arrive raw (`on_message`), are decoded by
`events.EventDecoder` (json/msgpack only, never pickle) and handed to the tracker under the lock
the collector also takes. A broker error never ends the process: the consumer reports itself
disconnected, waits with capped exponential backoff and connects again, forever.

On RabbitMQ the event queue is ours to declare, so it outlives a dropped connection (`expires`
instead of `auto_delete`: events published while we reconnect wait for us), holds messages for
`event_queue_ttl` and is bounded by `x-max-length`. On Redis events travel by pub/sub and nothing
waits for a disconnected subscriber; a restart there is counted as a reconnect.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery.events.event import get_exchange
from kombu import Connection, Consumer, Queue
from kombu.message import Message

from . import amqp_stream, redis_stream
from .config import EventQueueOptions
from .events import Event, EventDecoder, MalformedMessage
from .redis_stream import BacklogStats
from .tracker import Tracker

log = logging.getLogger(__name__)


@dataclass
class BrokerStatus:
    """What `/healthz` and the self-metrics report about the consumer; written by its thread."""

    broker: str = ""  # sanitised URL: never the password
    connected: bool = False
    reconnects: int = 0
    last_error: str = ""
    disconnected_at: float = field(default_factory=time.monotonic)
    last_poll: float = 0.0  # monotonic time of the consumer loop's last turn
    backlog: BacklogStats = field(default_factory=BacklogStats)

    def health(self, now: float | None = None, stall_after: float = 30.0) -> tuple[bool, str]:
        now = time.monotonic() if now is None else now
        if not self.connected:
            down = now - self.disconnected_at
            reason = f": {self.last_error}" if self.last_error else ""
            return False, f"not connected to {self.broker} for {down:.0f}s{reason}"
        if now - self.last_poll > stall_after:
            return False, f"consumer stalled: no poll for {now - self.last_poll:.0f}s"
        return True, f"ok: connected to {self.broker}, consuming events"


_AMQP_READ_SIZE = 16 << 10
#: A session that lasted this long resets the reconnect backoff.
_STABLE_SESSION = 30.0


def tune_amqp_reads(connection: Connection, poll_timeout: float) -> float | None:
    """Cut py-amqp's per-message syscalls; returns the timeout to pass to drain_events.

    py-amqp reads each frame as header, payload and end byte, exactly: nine recv() calls per
    event message, which cost more than decoding and counting the event. Its `_read` keeps
    whatever a recv returns beyond what it asked for, so asking for more is all it takes. And
    drain_events(timeout=t) sets and restores the socket timeout around every frame, so the
    socket gets the poll timeout once and drain_events none.
    """
    transport = getattr(connection.connection, "transport", None)
    recv = getattr(transport, "_quick_recv", None)
    sock = getattr(transport, "sock", None)
    if recv is None or sock is None or connection.transport.driver_type != "amqp":
        return poll_timeout

    def recv_more(size: int) -> bytes:
        return recv(max(size, _AMQP_READ_SIZE))

    transport._quick_recv = recv_more  # type: ignore[union-attr]
    sock.settimeout(poll_timeout)
    return None


class EventConsumer:
    """Consume the event exchange in a thread until `stop()`; reconnect on any broker error."""

    def __init__(
        self,
        connect: Callable[[], Connection],
        tracker: Tracker,
        lock: threading.Lock,
        status: BrokerStatus,
        queue_options: EventQueueOptions | None = None,
        on_connected: Callable[[], None] | None = None,
        backoff_cap: float = 5.0,
        poll_timeout: float = 1.0,
    ) -> None:
        self._connect = connect
        self._tracker = tracker
        self._lock = lock
        self.status = status
        self._queue_options = queue_options or EventQueueOptions()
        self._on_connected = on_connected
        self._backoff_cap = backoff_cap
        self._poll_timeout = poll_timeout
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="event-consumer", daemon=True)
        # One name for the life of the process, so a reconnect finds the queue it left.
        self._queue_name = f"{self._queue_options.prefix}.celery-obs.{uuid.uuid4()}"
        #: Reasons the decoder skipped events for, counted into the tracker under the lock.
        self._malformed: list[str] = []
        self._decoder = EventDecoder(on_malformed=self._malformed.append)
        self._sessions = 0  # successful connections so far; all but the first are reconnects

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._thread.join(timeout)

    # -- message path -------------------------------------------------------------------------

    def on_payload(self, payload: bytes) -> None:
        """A Redis pub/sub payload: kombu's envelope around the event body."""
        self._process(self._decoder.decode_envelope, payload)

    def on_message(self, message: Message) -> None:
        """A message delivered by kombu (transports without a fast path of their own)."""
        self._process(self._decoder.decode, message.body, message.content_type)

    def on_body(self, body: bytes, content_type: str | None) -> None:
        """A message body read straight off an AMQP socket."""
        self._process(self._decoder.decode, body, content_type)

    def _process(self, decode: Callable[..., list[Event]], *raw: Any) -> None:
        # Decoding needs no shared state: it runs outside the lock, so a scrape waits only
        # for the tracker's bookkeeping, never for a big message's JSON.
        events: list[Event] = []
        reason = ""
        try:
            events = decode(*raw)
        except MalformedMessage as exc:
            reason = exc.reason
            log.debug("skipped malformed event message: %s", exc)
        except Exception as exc:  # a message must never look like a broker failure
            reason = "decode"
            log.debug("skipped undecodable event message: %r", exc)
        with self._lock:
            if self._malformed:  # events the decoder skipped inside this message
                for skipped in self._malformed:
                    self._tracker.count_malformed(skipped)
                self._malformed.clear()
            if reason:
                self._tracker.count_malformed(reason)
            else:
                self._tracker.handle_all(events)

    # -- connection lifecycle -----------------------------------------------------------------

    def _event_queue(self, connection: Connection) -> Queue:
        options = self._queue_options
        amqp = connection.transport.driver_type == "amqp"
        arguments: dict[str, Any] = {}
        if amqp:
            arguments = {"x-max-length": options.max_length, "x-overflow": "drop-head"}
        return Queue(
            self._queue_name,
            exchange=get_exchange(connection),
            routing_key="#",
            durable=False,
            # RabbitMQ: outlive our reconnects (x-expires cleans up). Elsewhere events are
            # pub/sub and nothing waits in the queue; auto-delete drops the binding on exit.
            auto_delete=not amqp,
            message_ttl=options.ttl,
            expires=options.expires,
            queue_arguments=arguments,
        )

    def _run(self) -> None:
        delay = 0.5
        while not self._stopping.is_set():
            started = self.status.last_poll = time.monotonic()
            try:
                with self._connect() as connection:
                    connection.ensure_connection(max_retries=1)
                    self._consume(connection)
            except Exception as exc:  # every broker failure is survivable: report, back off, retry
                self._disconnected(exc)
                # Back off from the first attempt unless the session lived a while: a broker
                # that accepts the connection and then refuses to serve must not be hammered.
                if time.monotonic() - started > _STABLE_SESSION:
                    delay = 0.5
                if self._stopping.wait(delay):
                    break
                delay = min(delay * 2, self._backoff_cap)
        self.status.connected = False

    def _consume(self, connection: Connection) -> None:
        queue = self._event_queue(connection)
        stream = redis_stream.open_stream(
            connection, queue, self.status.backlog, self._queue_options.max_backlog_bytes
        )
        if stream is not None:
            self._connected()
            stream.run(self.on_payload, self._stopping, self._tick)
            return
        drain_timeout = tune_amqp_reads(connection, self._poll_timeout)
        channel = connection.channel()
        with Consumer(channel, queues=[queue], on_message=self.on_message, no_ack=True):
            self._connected()
            heartbeat_check = connection.heartbeat_check if connection.heartbeat else None
            fast = amqp_stream.open_stream(connection)
            if fast is not None:

                def idle() -> None:
                    self._tick()
                    if heartbeat_check is not None:
                        heartbeat_check()

                fast.run(self.on_body, self._stopping, idle)
            while not self._stopping.is_set():
                self._tick()
                with contextlib.suppress(TimeoutError):  # a quiet second, not an error
                    connection.drain_events(timeout=drain_timeout)
                if heartbeat_check is not None:
                    heartbeat_check()
        # A clean stop: our RabbitMQ queue would otherwise collect events until it expires.
        with contextlib.suppress(Exception):
            queue(channel).delete()

    def _tick(self) -> None:
        self.status.last_poll = time.monotonic()

    def _connected(self) -> None:
        self.status.connected = True
        self.status.last_error = ""
        if self._sessions:
            self.status.reconnects += 1
        self._sessions += 1
        log.info("consuming events from %s", self.status.broker)
        if self._on_connected is not None:
            self._on_connected()

    def _disconnected(self, exc: BaseException) -> None:
        was_connected = self.status.connected
        self.status.connected = False
        self.status.last_error = f"{type(exc).__name__}: {exc}"
        if was_connected:
            self.status.disconnected_at = time.monotonic()
            log.warning(
                "lost the broker %s: %s; reconnecting", self.status.broker, self.status.last_error
            )
        else:
            log.warning(
                "cannot connect to the broker %s: %s", self.status.broker, self.status.last_error
            )
