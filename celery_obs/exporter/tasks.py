"""The task table: every task id in flight and lately finished, its events counted and placed.

Counting and measuring are separate jobs here, because they need different certainty:

* **Counting** needs only the task's labels. Every event is counted once under (name, queue);
  an event is dropped only as a true redelivery of one already counted (same uuid, type,
  timestamp, hostname and attempt), never because we are unsure which attempt it belongs to.
* **Measuring** a duration needs its two ends to belong together. Only task-sent and
  task-received say which attempt they are (`retries`); workers buffer task events and send them
  in batches, from the main process and the pool children separately, so attempt N's
  task-started often arrives after attempt N+1's task-sent, and a worker running several
  threads or processes receives attempt N+1 (an ETA message, held until due) before attempt N
  has ended. What does hold: the events one worker sends about one task arrive in the order it
  sent them. So events are placed on *deliveries* of their own worker (`records`), measured by
  `durations`, and what cannot be placed is counted and measures nothing.

The queue label of an event is the queue of the attempt it belongs to (a retry may be sent to
another queue). Only task-sent carries it, so a worker's events for a task whose task-sent has
not arrived yet are parked for up to `sent_grace` seconds (while producers send task-sent at
all). Both tables are bounded: unfinished tasks beyond `max_tracked` are evicted (counted);
finished ones are kept in a smaller table to recognise redeliveries and late events.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from . import fields
from .aggregates import MAX_LABEL_LENGTH, LabelKey, TaskMetrics, clean_label
from .durations import Durations
from .metrics import UNKNOWN_LABEL
from .occupancy import Occupancy
from .records import MAX_FINGERPRINTS, Delivery, Send, TaskRecord
from .selfstats import ExporterStats
from .vocabulary import TASK_EVENTS

Event = dict[str, Any]


def _host(hostname: object) -> str | None:
    """The sender as the worker table labels it (cut, valid UTF-8), so that what a worker held
    is found by the name its worker-offline or lost state comes with; None if unusable."""
    if type(hostname) is not str:
        return None
    if len(hostname) <= MAX_LABEL_LENGTH and hostname.isascii():
        return hostname
    return clean_label(hostname)[0]


#: Producers are taken not to send task-sent events after this long without one.
SENT_EVENTS_ABSENT_AFTER = 300.0

_FINAL = frozenset(kind for kind, t in TASK_EVENTS.items() if t.final)
_COUNTED = frozenset(kind for kind, t in TASK_EVENTS.items() if t.counted)
_NUMBERED = frozenset(kind for kind, t in TASK_EVENTS.items() if t.numbered)
_INF = float("inf")

#: Where an event without an attempt number belongs: (record, hostname) -> delivery or None.
_PLACES: dict[str, Callable[[TaskRecord, object], Delivery | None]] = {
    "task-started": TaskRecord.next_to_start,
    "task-retried": lambda record, host: record.running(host, last=False),
    "task-succeeded": lambda record, host: record.running(host, last=True),
    "task-failed": lambda record, host: record.running(host, last=True),
    "task-revoked": TaskRecord.first_open,
    "task-rejected": TaskRecord.first_open,
    "task-cancelled": TaskRecord.first_open,
}


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
        # Read for every event: held here, not looked up through `metrics` each time.
        self._counts = metrics.counts
        self._last_at = metrics.last_at
        self._name_labels = metrics.task_names.values  # the limiter's fast path, without a call
        self.stats = stats
        self.occupancy = Occupancy()
        self.durations = Durations(metrics, stats, skew_tolerance, self.occupancy.ended)
        self.max_tracked = max_tracked
        self.max_finished = max_finished
        self.sent_grace = sent_grace
        self.inflight: OrderedDict[str, TaskRecord] = OrderedDict()
        self.finished: OrderedDict[str, TaskRecord] = OrderedDict()
        #: uuid -> (deadline, record) for tasks whose events are parked waiting for task-sent.
        self.waiting: OrderedDict[str, tuple[float, TaskRecord]] = OrderedDict()
        #: Monotonic time of the last task-sent; producers are assumed to send them at startup.
        self.last_sent_at = now
        #: Monotonic time of the event being handled (or of the last tick).
        self.now = now
        #: Wall time of the same: ETAs, ages and the last-seen timestamps are wall times.
        self.wall = 0.0
        #: Queue names seen in task-sent events, for the queue length probe.
        self.seen_queues: set[str] = set()

    # -- entry points -------------------------------------------------------------------------

    def begin(self, now: float, wall: float) -> None:
        """The monotonic and wall time of the events handled next (a batch's, read once)."""
        self.now = now
        self.wall = self.durations.wall = wall

    def handle(self, kind: str, event: Event) -> None:
        """Count and measure one task event (`kind` is a key of vocabulary.TASK_EVENTS), handled
        at the times `begin` was given."""
        if self.waiting:
            self.tick(self.now)
        if kind == "task-sent":
            self.last_sent_at = self.now
            self._apply(kind, event, None)
            parked = self.waiting.pop(event.get("uuid"), None)  # type: ignore[arg-type]
            if parked is not None:
                self._replay(parked[1])
        else:
            # The common case first: a task already labelled is never parked.
            uuid = event.get("uuid")
            record = self.inflight.get(uuid) if type(uuid) is str else None
            if record is not None and record.queue is not None:
                self._apply(kind, event, record)
            elif not self._park(event, self.now):
                self._apply(kind, event, None)

    def tick(self, now: float, wall: float | None = None) -> None:
        """Count parked events whose task-sent did not come within the grace period; with the
        wall time, also let deliveries whose ETA has come start waiting."""
        self.now = now
        if wall is not None:
            self.wall = self.durations.wall = wall  # for the parked events replayed below
            self.occupancy.tick(wall)
        while self.waiting:
            uuid, (deadline, record) = next(iter(self.waiting.items()))
            # Also bounded by count, not only by the event rate times the grace period.
            if deadline > now and len(self.waiting) <= 2 * self.max_tracked:
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
                self._apply(event["type"], event, None)
            except Exception:  # as in Tracker.handle: one bad event costs only itself
                self.stats.count_malformed("bad_field")

    # -- records ------------------------------------------------------------------------------

    def _new_record(self, uuid: str) -> TaskRecord:
        record = self.inflight[uuid] = TaskRecord(uuid)
        if len(self.inflight) > self.max_tracked:
            _, evicted = self.inflight.popitem(last=False)
            self.stats.tasks_evicted += 1
            for delivery in evicted.deliveries:
                self.occupancy.ended(delivery)  # forgotten: no longer shown running or waiting
                if delivery.wait_pending:  # it will never be measured now
                    self.stats.count_unmeasured("queue_wait", "evicted")
        return record

    def _finish(self, uuid: str, record: TaskRecord) -> None:
        record.final = True
        for delivery in record.deliveries:  # whatever event of them was lost, none runs now
            if delivery.place:
                self.occupancy.ended(delivery)
        if self.inflight.pop(uuid, None) is not None:
            self.finished[uuid] = record
            if len(self.finished) > self.max_finished:
                self.finished.popitem(last=False)

    def _record_for(
        self, uuid: str, kind: str, retries: int | None, fingerprint: int
    ) -> TaskRecord:
        """The record of a task id not in flight: a finished one, or a new one."""
        record = self.finished.get(uuid)
        if record is None:
            return self._new_record(uuid)
        if record.seen(fingerprint):
            return record  # a redelivery of an event of the finished run: recognised there
        if kind == "task-sent" and retries is not None and record.send_of(retries) is not None:
            # The id published again once its task had finished: apply_async(task_id=...)
            # reused it for a new run. Only a send says so; a delivery can be a redelivery.
            del self.finished[uuid]
            return self._new_record(uuid)
        if kind == "task-received":
            # Delivered again after it finished (acks_late after a time limit or a lost
            # worker): the same task id running again, still in flight.
            del self.finished[uuid]
            self.inflight[uuid] = record
            record.final = False
        return record

    # -- counting -----------------------------------------------------------------------------

    def _apply(self, kind: str, event: Event, record: TaskRecord | None) -> None:
        """Count and measure one event of `record` (None: look the task id up). This runs for
        every task event: the fields are read once here and passed on."""
        get = event.get
        hostname = get("hostname")
        host = (
            hostname
            if type(hostname) is str and len(hostname) <= MAX_LABEL_LENGTH and hostname.isascii()
            else _host(hostname)
        )
        retries = None
        if kind in _NUMBERED:
            retries = get("retries")
            if type(retries) is not int or retries < 0:  # not a known attempt (bools neither)
                retries = None
        ts_field = get("timestamp")
        if type(ts_field) is float:
            ts = ts_field if -_INF < ts_field < _INF else None  # also not NaN
        elif type(ts_field) is int:
            ts = fields.timestamp(ts_field)
        else:
            ts = ts_field = None
        fingerprint = hash((kind, ts_field, host, retries))
        if record is None:
            uuid = get("uuid")
            if not isinstance(uuid, str) or not uuid:
                self.stats.count_malformed("missing_uuid")
                return
            record = self.inflight.get(uuid) or self._record_for(uuid, kind, retries, fingerprint)
        prints = record.fingerprints
        if fingerprint in prints:
            self.stats.count_duplicate(kind)
            return
        prints.append(fingerprint)
        if len(prints) > MAX_FINGERPRINTS:
            del prints[: MAX_FINGERPRINTS // 2]
        name = get("name")
        if isinstance(name, str) and name:
            record.name = self._name_labels.get(name) or self.metrics.task_names(name)

        # Place before counting: the event is labelled with the queue of its own attempt.
        delivery, attempt_queue = self._place(kind, record, event, host, retries)
        if kind in _COUNTED:
            self._count(kind, record, event, attempt_queue, ts)
        if kind in _FINAL and not (kind == "task-rejected" and get("requeue")):
            # Before measuring: a bad field in the measurement must not leave it in flight.
            self._finish(record.uuid, record)
        self._measure(kind, record, event, host, delivery, retries, ts)

    def _place(
        self, kind: str, record: TaskRecord, event: Event, host: str | None, retries: int | None
    ) -> tuple[Delivery | None, str | None]:
        """The delivery an event belongs to (None for sends and receipts, which make their
        own), and the queue of its attempt."""
        if kind == "task-sent":
            queue = event.get("queue")
            if isinstance(queue, str) and queue:
                label = self.metrics.queues(queue)
                record.queue = label
                if label == queue:
                    self.seen_queues.add(queue)
            return None, record.queue
        if kind == "task-received":
            return None, record.queue_of(0 if retries is None else retries)
        delivery = _PLACES[kind](record, host)
        return delivery, record.queue_of(delivery.retries) if delivery else record.queue

    def _count(
        self, kind: str, record: TaskRecord, event: Event, queue: str | None, ts: float | None
    ) -> None:
        key: LabelKey = (record.name or UNKNOWN_LABEL, queue or UNKNOWN_LABEL)
        if kind == "task-failed":
            key = self._failure_key(record, event, key)
        counts = self._counts[kind]
        counts[key] = counts.get(key, 0) + 1
        last_at = self._last_at.get(kind)
        if last_at is not None:
            # The event's time, never later than ours (a worker clock ahead must not hide a
            # dead-man's switch), never going back (a late event of an older run).
            wall = self.wall
            at = wall if ts is None or ts > wall else ts
            if at > last_at.get(key[0], 0.0):
                last_at[key[0]] = at

    def _failure_key(self, record: TaskRecord, event: Event, key: LabelKey) -> LabelKey:
        exception = event.get("exception")
        if record.name is None and (missing := fields.not_registered_name(exception)):
            record.name = self.metrics.task_names(missing)
            key = (record.name, key[1])
        exception_class = fields.exception_class(exception, event.get("traceback"))
        return (*key, self.metrics.exceptions(exception_class))

    # -- measuring ----------------------------------------------------------------------------

    def _measure(
        self,
        kind: str,
        record: TaskRecord,
        event: Event,
        host: str | None,
        delivery: Delivery | None,
        retries: int | None,
        ts: float | None,
    ) -> None:
        durations = self.durations
        if kind == "task-sent":
            if retries is not None:
                self._sent(record, event, retries, ts)
        elif kind == "task-received":
            self._received(record, event, host, 0 if retries is None else retries, ts)
        elif kind == "task-started":
            record.ran = True
            if delivery is None:
                self.stats.count_unmeasured("queue_wait", "unplaced")
            else:
                durations.started(record, delivery, ts, self.sends_expected)
                self.occupancy.started(record, delivery, self.wall)
        elif kind in ("task-succeeded", "task-failed"):
            self._outcome(kind, record, event, host, delivery, ts)
        elif delivery is not None and not (kind == "task-rejected" and event.get("requeue")):
            # Retried, revoked, rejected and cancelled end their delivery.
            durations.close(record, delivery, kind)
        elif delivery is not None:
            # A requeued reject does not end its delivery for measuring (a hard time limit
            # under acks_late sends it *before* the task-failed of the same run, and a
            # redelivery closes it anyway: _received), but the task runs no more.
            self.occupancy.ended(delivery)

    def _sent(self, record: TaskRecord, event: Event, retries: int, ts: float | None) -> None:
        eta = event.get("eta")
        send = Send(retries, ts, fields.parse_eta(eta) if eta else None, record.queue)
        previous = record.send_of(retries)
        if previous is None:
            record.sends.append(send)
        elif not record.final:
            # The attempt published again while the task runs: Task.replace() (the old run ends
            # with Ignore, which sends no event) or the same id sent twice. What was running can
            # no longer end; what waits to start (the replacement's delivery may arrive before
            # this send) belongs to this send.
            for delivery in record.deliveries:
                if delivery.started is not None:
                    self.durations.abandon(record, delivery)
            record.sends[record.sends.index(previous)] = send
        if retries == 0 and record.origin is None:
            record.origin = send
        self.durations.sent(record, retries)

    def _received(
        self, record: TaskRecord, event: Event, host: str | None, retries: int, ts: float | None
    ) -> None:
        # The same attempt delivered again (acks_late after a lost worker, a requeued reject, a
        # replaced task): its earlier delivery will never end.
        for delivery in record.deliveries:
            if delivery.retries == retries:
                self.durations.abandon(record, delivery)
        eta = event.get("eta")
        new = Delivery(host, ts, retries, fields.parse_eta(eta) if eta else None)
        for dropped in record.add_delivery(new):
            self.durations.abandon(record, dropped)
        self.occupancy.received(record, new, self.wall)

    def _outcome(
        self,
        kind: str,
        record: TaskRecord,
        event: Event,
        host: str | None,
        delivery: Delivery | None,
        ts: float | None,
    ) -> None:
        durations = self.durations
        if delivery is None:
            delivery = record.first_open(host)  # an outcome before its start was seen
        if delivery is None:
            last = record.last_ended_on(host)
            if kind == "task-failed" and last is not None and last.end == "task-failed":
                return  # the second task-failed of a hard time limit: measured already
            if not record.ran and not record.deliveries:
                exception = event.get("exception")
                if kind == "task-failed" and fields.not_registered_name(exception):
                    durations.latency(record, ts, None)  # never ran: no runtime to miss
                    return
        if delivery is not None:
            durations.close(record, delivery, kind)
        runtime = fields.timestamp(event.get("runtime")) if kind == "task-succeeded" else None
        # Celery sends runtime=None when the worker was lost after the success.
        durations.outcome(record, delivery, kind, runtime, ts)
