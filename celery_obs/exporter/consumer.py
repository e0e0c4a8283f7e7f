"""Own the broker connection and feed every event on the celeryev exchange to the tracker.

kombu directly, not celery's `Receiver`: messages arrive raw (`on_message`), are decoded by
`events.EventDecoder` (json/msgpack only, never pickle) and handed to the tracker under the lock
the collector also takes. A broker error never ends the process: the consumer reports itself
disconnected, waits with capped exponential backoff and connects again, forever.

On RabbitMQ the event queue is ours to declare. Its name is stable per exporter instance and it
outlives a dropped connection or a restart (`expires` instead of `auto_delete`: events published
meanwhile wait for us), holds messages for `event_queue_ttl` and is bounded by `x-max-length`.
Deliveries are acknowledged after they are processed, with a bounded prefetch, so a stalled link
or a crash loses nothing that reached the queue. On Redis events travel by pub/sub and nothing
waits for a disconnected subscriber; a restart there is counted as a reconnect.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from amqp.exceptions import PreconditionFailed
from kombu import Connection, Consumer, Queue
from kombu.message import Message

from ..retry import Backoff
from . import amqp_stream, redis_stream
from .config import EventQueueOptions
from .events import Event, EventDecoder, MalformedMessage
from .redis_link import RedisSettings
from .redis_stream import BacklogStats
from .tracker import Tracker
from .transports import connect_once, driver_of, event_exchange

log = logging.getLogger(__name__)


def default_queue_name(prefix: str, instance: str) -> str:
    """`celeryev.celery-obs.<host>.<instance>`: stable across restarts of one exporter."""
    return f"{prefix}.celery-obs.{socket.gethostname()}.{instance}"


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
    #: How events are read: redis-socket / amqp-socket (the fast paths) or kombu.
    reader: str = ""
    #: Broadcast rounds to the workers (heartbeat, enable_events) that failed.
    broadcast_errors: int = 0

    def liveness(self, now: float | None = None, stall_after: float = 60.0) -> tuple[bool, str]:
        """/livez: is the consumer loop turning? It keeps turning through a broker outage
        (each reconnect attempt is a turn), so an outage never fails it: restarting the
        exporter would not bring the broker back. Only a loop stuck for `stall_after` does."""
        now = time.monotonic() if now is None else now
        if now - self.last_poll > stall_after:
            return False, f"consumer stuck: no turn of its loop for {now - self.last_poll:.0f}s"
        state = "consuming events" if self.connected else "reconnecting to the broker"
        return True, f"ok: alive, {state}"

    def health(self, now: float | None = None, stall_after: float = 30.0) -> tuple[bool, str]:
        """/readyz (and /healthz): connected and consuming, so the metrics are fresh."""
        now = time.monotonic() if now is None else now
        if not self.connected:
            down = now - self.disconnected_at
            reason = f": {self.last_error}" if self.last_error else ""
            return False, f"not connected to {self.broker} for {down:.0f}s{reason}"
        if now - self.last_poll > stall_after:
            return False, f"consumer stalled: no poll for {now - self.last_poll:.0f}s"
        return True, f"ok: connected to {self.broker}, consuming events"


#: Longest broker error shown in /healthz and the log.
_MAX_ERROR_LENGTH = 400
#: A session that lasted this long resets the reconnect backoff.
_STABLE_SESSION = 30.0


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
        scrub: Callable[[str], str] = str,
        redis: RedisSettings | None = None,
    ) -> None:
        self._connect = connect
        #: On Redis, events are read over a socket of our own and `connect` is never called.
        self._redis = redis
        self._tracker = tracker
        self._lock = lock
        self.status = status
        self._queue_options = queue_options or EventQueueOptions()
        self._on_connected = on_connected
        if not backoff_cap > 0:
            raise ValueError("backoff_cap must be positive")
        self._backoff_cap = backoff_cap
        self._poll_timeout = poll_timeout
        #: Broker errors can quote credentials (a URL, a login): they are shown scrubbed.
        self._scrub = scrub
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="event-consumer", daemon=True)
        # One name per exporter instance (not per process), so a reconnect or a restart finds
        # the queue it left, with what was published meanwhile.
        self._queue_name = self._queue_options.name or default_queue_name(
            self._queue_options.prefix, "exporter"
        )
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

    def on_payloads(self, payloads: list[bytes]) -> None:
        """Redis pub/sub payloads (kombu's envelope around the event body) read together."""
        self._decode_all(self._decoder.decode_envelope, payloads)

    def on_bodies(self, bodies: list[tuple[bytes, str | None]]) -> None:
        """Message bodies, with their content types, read off an AMQP socket together."""
        decode = self._decoder.decode
        self._decode_all(lambda body_and_type: decode(*body_and_type), bodies)

    def on_message(self, message: Message) -> None:
        """A message delivered by kombu (transports without a fast path of their own)."""
        decode = self._decoder.decode
        self._decode_all(lambda one: decode(one.body, one.content_type), [message])
        if not message.acknowledged and message.delivery_info.get("delivery_tag") is not None:
            with contextlib.suppress(Exception):  # pub/sub transports have nothing to ack
                message.ack()

    def _decode_all(self, decode: Callable[[Any], list[Event]], messages: list) -> None:
        # Decoding needs no shared state: it runs outside the lock, message by message (a bad
        # one costs only itself), so a scrape waits only for the tracker's bookkeeping, under
        # one acquisition for all of them, never for a big message's JSON.
        events: list[Event] = []
        reasons: list[str] = []
        for message in messages:
            try:
                events += decode(message)
            except MalformedMessage as exc:
                reasons.append(exc.reason)
                log.debug("skipped malformed event message: %s", exc)
            except Exception as exc:  # a message must never look like a broker failure
                reasons.append("decode")
                log.debug("skipped undecodable event message: %r", exc)
        self._hand_over(events, reasons)

    def _hand_over(self, events: list[Event], reasons: list[str]) -> None:
        with self._lock:
            # Events the decoder skipped inside messages, then messages it could not use.
            for skipped in (*self._malformed, *reasons):
                self._tracker.count_malformed(skipped)
            self._malformed.clear()
            if events:
                self._tracker.handle_all(events)

    # -- connection lifecycle -----------------------------------------------------------------

    def _event_queue(self, connection: Connection) -> Queue:
        options = self._queue_options
        amqp = driver_of(connection) == "amqp"
        arguments: dict[str, Any] = {}
        if amqp:
            arguments = {
                "x-max-length": options.max_length,
                "x-overflow": "drop-head",
                # Two exporters given the same queue name would split the stream between them;
                # with a single active consumer the second one stands by instead.
                "x-single-active-consumer": True,
            }
        return Queue(
            self._queue_name,
            exchange=event_exchange(connection),
            routing_key="#",
            durable=False,
            # RabbitMQ: outlive our reconnects and restarts (x-expires cleans up). Elsewhere
            # events are pub/sub and nothing waits in the queue; auto-delete drops the binding.
            auto_delete=not amqp,
            message_ttl=options.ttl,
            expires=options.expires,
            queue_arguments=arguments,
        )

    def _run(self) -> None:
        backoff = Backoff(min(0.5, self._backoff_cap), self._backoff_cap)
        while not self._stopping.is_set():
            started = self.status.last_poll = time.monotonic()
            self._session()
            # Back off from the first attempt unless the session lived a while: a broker that
            # accepts the connection and then refuses to serve must not be hammered.
            if time.monotonic() - started > _STABLE_SESSION:
                backoff.reset()
            if self._stopping.wait(backoff.next()):
                break
        self.status.connected = False

    def _session(self) -> None:
        """One connection, from connecting to its end. Every broker failure is survivable:
        it is reported here and never escapes."""
        if self._redis is not None:
            try:
                self._consume_redis(self._redis)
            except Exception as exc:
                self._disconnected(exc)
            return
        try:
            with self._connect() as connection:  # kombu: settings only until used
                try:
                    self._consume(connection)
                except Exception as exc:
                    # Say so now: saying goodbye on a dead link (the `with` exit) could wait
                    # out a socket timeout first. Let go of it without a goodbye instead.
                    self._disconnected(exc)
                    with contextlib.suppress(Exception):
                        connection.collect()
        except Exception as exc:
            self._disconnected(exc)

    def _consume_redis(self, settings: RedisSettings) -> None:
        stream = redis_stream.open_stream(
            settings, self.status.backlog, self._queue_options.max_backlog_bytes
        )
        self.status.reader = "redis-socket"
        stream.run(self.on_payloads, self._stopping, self._tick, on_subscribed=self._connected)

    def _consume(self, connection: Connection) -> None:
        connect_once(connection)
        queue = self._event_queue(connection)
        channel = self._declare(connection, queue)
        # AMQP: acknowledged deliveries, at most `prefetch` in flight: a stalled link or a
        # restart loses nothing that reached the queue (unacknowledged deliveries come back).
        # kombu's virtual transports (memory, filesystem, SQS...) give their messages no
        # delivery tag we ack by, so there they are taken unacknowledged, as Celery's own
        # Receiver takes them: held for an ack that never comes, they stalled the consumer
        # once `prefetch` of them were in flight.
        acks = driver_of(connection) == "amqp"
        channel.basic_qos(0, self._queue_options.prefetch, False)
        consumer = Consumer(
            channel, queues=[queue], on_message=self.on_message, no_ack=not acks, auto_declare=False
        )
        consumer.consume()
        self._connected()
        heartbeat_check = connection.heartbeat_check if connection.heartbeat else None
        fast = amqp_stream.open_stream(connection, channel.channel_id)
        if fast is not None:
            self.status.reader = "amqp-socket"

            def idle() -> None:
                self._tick()
                if heartbeat_check is not None:
                    heartbeat_check()

            fast.run(self.on_bodies, self._stopping, idle, self._on_oversized)
            # A stop: the socket may hold bytes py-amqp never saw, so no goodbye on it. What
            # was delivered and not acknowledged goes back to the queue, which a restart finds.
            connection.collect()
            return
        self.status.reader = "kombu"
        while not self._stopping.is_set():
            self._tick()
            with contextlib.suppress(TimeoutError):  # a quiet second, not an error
                connection.drain_events(timeout=self._poll_timeout)
            if heartbeat_check is not None:
                heartbeat_check()
        consumer.cancel()
        # A clean stop leaves the queue: a restart within --event-queue-expires finds it with
        # every event published meanwhile; otherwise the broker deletes it.

    def _declare(self, connection: Connection, queue: Queue) -> Any:
        """Declare our event queue (and its binding); a channel to consume it on."""
        channel = connection.channel()
        try:
            declared = queue(channel).declare()
        except PreconditionFailed as exc:
            # The queue exists with other arguments (changed --event-queue-* flags, an older
            # version): it cannot be redeclared as is. Its events are for us; replace it.
            log.warning(
                "event queue %s exists with other settings (%s); replacing it", queue.name, exc
            )
            channel = connection.channel()
            queue(channel).delete()
            declared = queue(channel).declare()
        consumers = getattr(declared, "consumer_count", 0) if declared else 0
        if consumers:
            log.warning(
                "event queue %s already has %d consumer(s): another exporter uses the same "
                "--event-queue-name (or a previous run's connection is not closed yet); this "
                "one stands by until it is the queue's only consumer",
                queue.name,
                consumers,
            )
        return channel

    def _on_oversized(self, size: int) -> None:
        with self._lock:
            self._tracker.count_malformed("too_large")
        log.debug("skipped an event message of %d bytes", size)

    def _tick(self) -> None:
        self.status.last_poll = time.monotonic()

    def _connected(self) -> None:
        with self._lock:
            self._tracker.stream_resumed()
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
        error = self._scrub(f"{type(exc).__name__}: {exc}")
        if len(error) > _MAX_ERROR_LENGTH:  # redis-py quotes whole client reprs in its errors
            error = error[:_MAX_ERROR_LENGTH] + "..."
        repeated = error == self.status.last_error
        self.status.connected = False
        self.status.last_error = error
        if was_connected:
            with self._lock:
                self._tracker.stream_stopped()
            self.status.disconnected_at = time.monotonic()
            log.warning("lost the broker %s: %s; reconnecting", self.status.broker, error)
        elif not repeated:  # said once; every retry of the same failure is not news
            log.warning("cannot connect to the broker %s: %s", self.status.broker, error)
        else:
            log.debug("still cannot connect to the broker %s: %s", self.status.broker, error)
