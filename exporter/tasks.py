"""The task table: every task id in flight, its attempts and deliveries, counted and measured.

Counting and measuring are separate jobs here, because they need different certainty:

* **Counting** needs only the task's labels. Every event is counted once under (name, queue);
  an event is dropped only as a true redelivery of one already counted (same uuid, type,
  timestamp and hostname), never because we are unsure which attempt it belongs to.
* **Measuring** a duration needs the two ends of it to belong together, and only task-sent and
  task-received say which attempt they are (`retries`). Workers buffer task events and send them
  in batches, from the main process and the pool children separately, so attempt N's
  task-started often arrives after attempt N+1's task-sent, and a worker running several
  threads or processes receives attempt N+1 (an ETA message, held until due) before attempt N
  has ended. What does hold: the events one worker's main process sends about one task arrive in
  the order it sent them. So each task-received opens a *delivery* (hostname, attempt, times),
  a task-started belongs to the first delivery on its worker that has not started, and an ending
  event (retried, succeeded, failed, revoked, rejected) to the first one that has started and
  not ended. An event that cannot be placed is counted and measures nothing, counted by reason.

Only task-sent carries the queue, so a worker's events for a task whose task-sent has not
arrived yet are parked for up to `sent_grace` seconds (while producers send task-sent at all).
Both tables are bounded: unfinished tasks beyond `max_tracked` are evicted (counted); finished
ones are kept in a smaller table to recognise redeliveries and late events.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from . import fields
from .aggregates import LabelKey, TaskMetrics
from .metrics import UNKNOWN_LABEL
from .selfstats import ExporterStats
from .vocabulary import TASK_EVENTS

Event = dict[str, Any]

#: Producers are taken not to send task-sent events after this long without one.
SENT_EVENTS_ABSENT_AFTER = 300.0

#: Longer durations are not believed (a timestamp of 1e308, a runtime past float range): they
#: would poison a histogram's sum for good. Ten years.
MAX_DURATION = 10 * 365 * 86_400.0

_FINAL = frozenset(kind for kind, t in TASK_EVENTS.items() if t.final)
_NUMBERS = (float, int)


class Delivery:
    """One task-received: the task handed to a worker, and what that worker did with it."""

    __slots__ = ("end", "eta", "host", "received", "retries", "started", "wait_pending")

    def __init__(self, host: object, received: float | None, retries: int, eta: float | None):
        self.host = host
        self.received = received
        self.retries = retries
        self.eta = eta
        self.started: float | None = None
        #: The event type that ended it ("" while open).
        self.end = ""
        #: Started, but its attempt's task-sent (the start of the wait) has not arrived yet.
        self.wait_pending = False

    @property
    def ended(self) -> bool:
        return bool(self.end)


class TaskRecord:
    __slots__ = (
        "deliveries",
        "final",
        "fingerprints",
        "latency_done",
        "name",
        "pending",
        "queue",
        "ran",
        "sends",
    )

    def __init__(self) -> None:
        self.name: str | None = None
        self.queue: str | None = None
        #: (attempt, timestamp, eta) per task-sent, first of each attempt only.
        self.sends: list[tuple[int, float | None, float | None]] = []
        self.deliveries: list[Delivery] = []
        #: hash((type, timestamp, hostname)) of every event counted for this task id.
        self.fingerprints = array("q")
        self.final = False
        #: A task-started was seen (a failure without one never ran: NotRegistered).
        self.ran = False
        self.latency_done = False
        #: Events held back until this task's task-sent (which carries the queue) arrives.
        self.pending: list[Event] | None = None

    def send_of(self, retries: int) -> tuple[int, float | None, float | None] | None:
        for send in self.sends:
            if send[0] == retries:
                return send
        return None

    def next_to_start(self, host: object) -> Delivery | None:
        """The delivery a task-started from `host` is about: its first one not started yet."""
        for delivery in self.deliveries:
            if delivery.host == host and delivery.started is None and not delivery.ended:
                return delivery
        return None

    def open_on(self, host: object) -> Delivery | None:
        """The delivery an ending event from `host` is about: its first running one, else its
        first one not ended (a task revoked or rejected before it started)."""
        waiting = None
        for delivery in self.deliveries:
            if delivery.host == host and not delivery.ended:
                if delivery.started is not None:
                    return delivery
                waiting = waiting or delivery
        return waiting

    def last_ended_on(self, host: object) -> Delivery | None:
        for delivery in reversed(self.deliveries):
            if delivery.host == host and delivery.ended:
                return delivery
        return None


class TaskTable:
    def __init__(
        self,
        metrics: TaskMetrics,
        stats: ExporterStats,
        *,
        max_tracked: int,
        max_finished: int,
        sent_grace: float,
        skew_tolerance: float,
        now: float,
    ) -> None:
        self.metrics = metrics
        self.stats = stats
        self.max_tracked = max_tracked
        self.max_finished = max_finished
        self.sent_grace = sent_grace
        self.skew_tolerance = skew_tolerance
        self.inflight: OrderedDict[str, TaskRecord] = OrderedDict()
        self.finished: OrderedDict[str, TaskRecord] = OrderedDict()
        #: uuid -> (deadline, record) for tasks whose events are parked waiting for task-sent.
        self.waiting: OrderedDict[str, tuple[float, TaskRecord]] = OrderedDict()
        #: Monotonic time of the last task-sent; producers are assumed to send them at startup.
        self.last_sent_at = now
        #: Monotonic time of the event being handled (or of the last tick).
        self.now = now
        #: Queue names seen in task-sent events, for the queue length probe.
        self.seen_queues: set[str] = set()
        self._measure: dict[str, Callable[[TaskRecord, Event, float | None], None]] = {
            "task-sent": self._on_sent,
            "task-received": self._on_received,
            "task-started": self._on_started,
            "task-succeeded": self._on_succeeded,
            "task-failed": self._on_failed,
            "task-retried": self._on_ended,
            "task-revoked": self._on_ended,
            "task-rejected": self._on_ended,
        }

    # -- entry points -------------------------------------------------------------------------

    def handle(self, kind: str, event: Event, now: float) -> None:
        """Count and measure one task event (`kind` is a key of vocabulary.TASK_EVENTS)."""
        self.now = now
        if self.waiting:
            self.tick(now)
        if kind == "task-sent":
            self.last_sent_at = now
            self._apply(kind, event)
            parked = self.waiting.pop(event.get("uuid"), None)  # type: ignore[arg-type]
            if parked is not None:
                self._replay(parked[1])
        elif not self._park(event, now):
            self._apply(kind, event)

    def tick(self, now: float) -> None:
        """Count parked events whose task-sent did not come within the grace period."""
        self.now = now
        while self.waiting:
            uuid, (deadline, record) = next(iter(self.waiting.items()))
            if deadline > now:
                break
            del self.waiting[uuid]
            # Its task-sent is not coming: count what waited, and park nothing more of it.
            record.queue = record.queue or UNKNOWN_LABEL
            self._replay(record)

    @property
    def sends_expected(self) -> bool:
        """Whether the cluster's producers send task-sent events (one came in 5 minutes)."""
        return self.now - self.last_sent_at <= SENT_EVENTS_ABSENT_AFTER

    # -- parking ------------------------------------------------------------------------------

    def _park(self, event: Event, now: float) -> bool:
        """Hold a worker-side event back while its task's task-sent may still be on the way.

        The producer publishes task-sent just after the task message, so a quick worker's
        task-received (and more) often reaches us first; counting it at once would label it
        `queue_name="unknown"`. While the cluster's producers send task-sent events, a task's
        events wait up to `sent_grace` for it, then are counted with what is known.
        """
        if not self.sends_expected:
            return False
        uuid = event.get("uuid")
        if not isinstance(uuid, str) or not uuid:
            return False
        waiting = self.waiting.get(uuid)
        if waiting is not None:  # also when its record was evicted meanwhile
            waiting[1].pending.append(event)  # type: ignore[union-attr]
            return True
        record = self.inflight.get(uuid)
        if record is None:
            if uuid in self.finished:
                return False
            record = self._new_record(uuid)
        elif record.queue is not None or record.sends:
            return False
        if record.pending is None:
            record.pending = []
            self.waiting[uuid] = (now + self.sent_grace, record)
        record.pending.append(event)
        return True

    def _replay(self, record: TaskRecord) -> None:
        pending, record.pending = record.pending or [], None
        for event in pending:
            try:
                self._apply(event["type"], event)
            except Exception:  # as in Tracker.handle: one bad event costs only itself
                self.stats.count_malformed("bad_field")

    # -- records ------------------------------------------------------------------------------

    def _new_record(self, uuid: str) -> TaskRecord:
        record = self.inflight[uuid] = TaskRecord()
        if len(self.inflight) > self.max_tracked:
            self.inflight.popitem(last=False)
            self.stats.tasks_evicted += 1
        return record

    def _finish(self, uuid: str, record: TaskRecord) -> None:
        record.final = True
        if self.inflight.pop(uuid, None) is not None:
            self.finished[uuid] = record
            if len(self.finished) > self.max_finished:
                self.finished.popitem(last=False)

    def _is_new_run(self, record: TaskRecord, kind: str, event: Event) -> bool:
        """A finished task's id sent or received again: `apply_async(task_id=...)` reused it."""
        retries = fields.attempt(event.get("retries"))
        if retries is None:
            return False
        if kind == "task-sent":
            return record.send_of(retries) is not None
        if kind == "task-received":
            return any(d.retries == retries for d in record.deliveries)
        return False

    def _apply(self, kind: str, event: Event) -> None:
        uuid = event.get("uuid")
        if not isinstance(uuid, str) or not uuid:
            self.stats.count_malformed("missing_uuid")
            return
        ts_field, host = event.get("timestamp"), event.get("hostname")
        fingerprint = hash(
            (
                kind,
                ts_field if type(ts_field) in _NUMBERS else None,
                host if type(host) is str else None,
            )
        )
        record = self.inflight.get(uuid)
        if record is None:
            record = self.finished.get(uuid)
            if record is None:
                record = self._new_record(uuid)
            elif fingerprint not in record.fingerprints and self._is_new_run(record, kind, event):
                del self.finished[uuid]
                record = self._new_record(uuid)
        if fingerprint in record.fingerprints:
            self.stats.count_duplicate(kind)
            return
        record.fingerprints.append(fingerprint)

        metrics = self.metrics
        name = event.get("name")
        if name is not None:
            record.name = metrics.task_names(name)
        if kind == "task-sent":
            queue = event.get("queue")
            if isinstance(queue, str) and queue:
                record.queue = metrics.queues(queue)
                if record.queue == queue:
                    self.seen_queues.add(queue)
        key: LabelKey = (record.name or UNKNOWN_LABEL, record.queue or UNKNOWN_LABEL)
        if kind == "task-failed":
            exception = event.get("exception")
            if record.name is None and (missing := fields.not_registered_name(exception)):
                record.name = metrics.task_names(missing)
                key = (record.name, key[1])
            exception_label = metrics.exceptions(
                fields.exception_class(exception, event.get("traceback"))
            )
            key = (*key, exception_label)
        counts = metrics.counts[kind]
        counts[key] = counts.get(key, 0) + 1

        if kind in _FINAL and not (kind == "task-rejected" and event.get("requeue")):
            # Before measuring: a bad field in the measurement must not leave it in flight.
            self._finish(uuid, record)
        self._measure[kind](record, event, fields.timestamp(ts_field))

    # -- measuring ----------------------------------------------------------------------------

    def _key(self, record: TaskRecord) -> LabelKey:
        return (record.name or UNKNOWN_LABEL, record.queue or UNKNOWN_LABEL)

    def _observe(self, metric: str, key: LabelKey, value: float) -> None:
        if not value < MAX_DURATION:  # also NaN and +inf
            self.stats.count_unmeasured(metric, "implausible")
            return
        if value < 0:
            # task-sent is stamped after the publish, so a quick worker can start a task a few
            # ms "before" it was sent: within the tolerance that is 0, not clock skew.
            if value < -self.skew_tolerance:
                self.stats.count_negative(metric)
            value = 0.0
        if not self.metrics.observe(getattr(self.metrics, metric), key, value):
            self.stats.count_unmeasured(metric, "implausible")  # -inf

    def _on_sent(self, record: TaskRecord, event: Event, ts: float | None) -> None:
        retries = fields.attempt(event.get("retries"))
        if retries is None or record.send_of(retries) is not None:
            return  # the same attempt published twice: the first one measures
        record.sends.append((retries, ts, fields.parse_eta(event.get("eta"))))
        for delivery in record.deliveries:
            if delivery.retries == retries and delivery.wait_pending:
                self._observe_wait(record, delivery)

    def _on_received(self, record: TaskRecord, event: Event, ts: float | None) -> None:
        retries = fields.attempt(event.get("retries"))
        delivery = Delivery(
            event.get("hostname"),
            ts,
            0 if retries is None else retries,
            fields.parse_eta(event.get("eta")),
        )
        record.deliveries.append(delivery)

    def _on_started(self, record: TaskRecord, event: Event, ts: float | None) -> None:
        record.ran = True
        delivery = record.next_to_start(event.get("hostname"))
        if delivery is None:
            self.stats.count_unmeasured("queue_wait", "unplaced")
            return
        delivery.started = ts
        if record.send_of(delivery.retries) is None and self.sends_expected:
            delivery.wait_pending = True  # its task-sent may be on the way (or _end decides)
        else:
            self._observe_wait(record, delivery)

    def _observe_wait(self, record: TaskRecord, delivery: Delivery) -> None:
        """Queue wait of one delivery: from its attempt's send (or its receipt) to its start."""
        delivery.wait_pending = False
        send = record.send_of(delivery.retries)
        due = delivery.received if send is None or send[1] is None else send[1]
        eta = delivery.eta if send is None or send[2] is None else send[2]
        if due is None or delivery.started is None:
            self.stats.count_unmeasured("queue_wait", "no_timestamp")
            return
        if eta is not None and eta > due:  # an ETA/countdown is a wait the caller asked for
            due = eta
        self._observe("queue_wait", self._key(record), delivery.started - due)

    def _end(self, record: TaskRecord, kind: str, event: Event) -> Delivery | None:
        """Close the delivery this event is about; None if there is none open on its worker."""
        delivery = record.open_on(event.get("hostname"))
        if delivery is None:
            return None
        delivery.end = kind
        if delivery.wait_pending:  # no task-sent came while it ran: wait from its receipt
            self._observe_wait(record, delivery)
        return delivery

    def _on_ended(self, record: TaskRecord, event: Event, ts: float | None) -> None:
        self._end(record, event["type"], event)

    def _on_succeeded(self, record: TaskRecord, event: Event, ts: float | None) -> None:
        delivery = self._end(record, "task-succeeded", event)
        runtime = fields.timestamp(event.get("runtime"))
        if runtime is None:  # Celery sends None when the worker was lost after the success
            runtime = self._runtime_of(delivery, ts)
        if runtime is not None:
            self._observe("runtime", (*self._key(record), "succeeded"), runtime)
        self._observe_latency(record, ts)

    def _on_failed(self, record: TaskRecord, event: Event, ts: float | None) -> None:
        host = event.get("hostname")
        delivery = self._end(record, "task-failed", event)
        if delivery is None and (last := record.last_ended_on(host)) and last.end == "task-failed":
            return  # the second task-failed of a hard time limit: the failure was measured
        if record.ran or record.deliveries:  # else it never ran (NotRegistered): no runtime
            runtime = self._runtime_of(delivery, ts)
            if runtime is not None:
                self._observe("runtime", (*self._key(record), "failed"), runtime)
        self._observe_latency(record, ts)

    def _runtime_of(self, delivery: Delivery | None, ts: float | None) -> float | None:
        if delivery is None:
            self.stats.count_unmeasured("runtime", "unplaced")
            return None
        if delivery.started is None:
            self.stats.count_unmeasured("runtime", "no_start")
            return None
        if ts is None:
            self.stats.count_unmeasured("runtime", "no_timestamp")
            return None
        return ts - delivery.started

    def _observe_latency(self, record: TaskRecord, ts: float | None) -> None:
        """End to end, once per task: first send to the final outcome, minus the first ETA.

        Retries (and their countdowns) are inside it: the caller waits through them.
        """
        if record.latency_done:
            return
        record.latency_done = True
        send = record.send_of(0)
        if send is not None and send[1] is not None:
            start, eta = send[1], send[2]
        else:
            first = next((d for d in record.deliveries if d.retries == 0), None)
            if first is None or first.received is None:
                self.stats.count_unmeasured("latency", "first_attempt_unseen")
                return
            start, eta = first.received, first.eta
        if ts is None:
            self.stats.count_unmeasured("latency", "no_timestamp")
            return
        if eta is not None and eta > start:
            start = eta
        self._observe("latency", self._key(record), ts - start)
