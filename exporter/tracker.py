"""Turn Celery event dicts into metric state. Pure logic: no I/O, no locks, the clock is injected.

Only `task-sent` carries the queue, only `task-sent`/`task-received` carry the task name and only
`task-succeeded` carries a runtime, so the tracker keeps a bounded table of in-flight tasks (uuid ->
name, queue, timestamps) to label the events that follow. Finished tasks move to a small table of
their own so that duplicate or late events are recognised without keeping every uuid forever.
Every bound that drops something counts what it dropped.

Task events are counted once per *attempt*: a retry re-delivers the same uuid with a higher
`retries`, which starts a new attempt; the same event type seen twice within one attempt is a
duplicate (re-delivery, or the second task-failed a hard time limit can produce) and is not counted.
"""

from __future__ import annotations

import math
import re
import time
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .metrics import DEFAULT_BUCKETS, OVERFLOW_LABEL, UNKNOWN_LABEL

Event = dict[str, Any]
LabelKey = tuple[str, ...]

KNOWN_EVENT_TYPES = frozenset(
    {
        "task-sent",
        "task-received",
        "task-started",
        "task-succeeded",
        "task-failed",
        "task-retried",
        "task-revoked",
        "task-rejected",
        "task-cancelled",
        "worker-online",
        "worker-heartbeat",
        "worker-offline",
    }
)

# One bit per task event type, to remember what an attempt has already seen.
_BIT: dict[str, int] = {
    "task-sent": 1,
    "task-received": 2,
    "task-started": 4,
    "task-succeeded": 8,
    "task-failed": 16,
    "task-retried": 32,
    "task-revoked": 64,
    "task-rejected": 128,
}

#: Producers are taken not to send task-sent events after this long without one.
SENT_EVENTS_ABSENT_AFTER = 300.0

_CALL_REPR = re.compile(r"([A-Za-z_][\w.]*)\(")
_TRACEBACK_TAIL = re.compile(r"([A-Za-z_][\w.]*)(?::|$)")
_WRAPPERS = frozenset({"ExceptionWithTraceback", "ExceptionInfo"})
_NOT_REGISTERED = re.compile(r"NotRegistered\((['\"])(.+)\1\)")


@dataclass(frozen=True)
class Limits:
    """Bounds on memory and label cardinality; see the CLI flags of the same names."""

    max_task_names: int = 500
    max_exceptions: int = 200
    max_queues: int = 200
    max_workers: int = 2000
    max_tracked_tasks: int = 100_000
    max_finished_tasks: int = 20_000
    #: How long a task's worker-side events wait for its task-sent (which may arrive later).
    sent_grace: float = 1.0
    worker_timeout: float = 10.0
    worker_retention: float = 3600.0
    buckets: tuple[float, ...] = DEFAULT_BUCKETS


class LabelLimiter:
    """Pass through the first `limit` distinct values, map the rest to `other` and count them."""

    __slots__ = ("limit", "overflow", "values")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        # value -> the first instance seen: records then share one string per name instead of
        # each holding the copy its event was decoded into (~70 bytes per tracked task).
        self.values: dict[str, str] = {}
        self.overflow = 0

    def __call__(self, value: object) -> str:
        if not isinstance(value, str) or not value:
            return UNKNOWN_LABEL
        known = self.values.get(value)
        if known is not None:
            return known
        if len(self.values) < self.limit:
            self.values[value] = value
            return value
        self.overflow += 1
        return OVERFLOW_LABEL


class Histogram:
    """Per-bucket (not cumulative) counts plus sum; the collector accumulates at scrape time."""

    __slots__ = ("counts", "sum")

    def __init__(self, nbuckets: int) -> None:
        self.counts = [0] * (nbuckets + 1)  # the last slot is +Inf
        self.sum = 0.0


class TaskRecord:
    __slots__ = (
        "eta",
        "name",
        "pending",
        "queue",
        "received",
        "retries",
        "seen",
        "sent",
        "started",
        "waited",
    )

    def __init__(self) -> None:
        self.name: str | None = None
        self.queue: str | None = None
        self.retries: int = 0
        self.sent: float | None = None
        self.received: float | None = None
        self.started: float | None = None
        self.eta: float | None = None
        self.seen = 0
        self.waited = False
        #: Events held back until this task's task-sent (which carries the queue) arrives.
        self.pending: list[Event] | None = None

    def new_attempt(self, retries: int) -> None:
        self.retries = retries
        self.sent = self.received = self.started = None
        self.seen = 0
        self.waited = False


class WorkerRecord:
    __slots__ = ("active", "last_seen", "last_seen_at", "offline_at", "processed")

    def __init__(self, now: float) -> None:
        self.last_seen = now  # monotonic: liveness arithmetic
        self.last_seen_at = 0.0  # wall time: the exported timestamp
        self.active = 0
        self.processed = 0
        self.offline_at: float | None = None


@dataclass(frozen=True)
class WorkerView:
    hostname: str
    up: bool
    active: int
    processed: int
    last_seen: float


_STARTS_RUN = _BIT["task-sent"] | _BIT["task-received"]


def parse_eta(value: object) -> float | None:
    """ETA/countdown as a Unix timestamp; Celery sends ISO 8601 (naive means UTC)."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def exception_class(exception: object, traceback: object = None) -> str:
    """The exception's class name, e.g. `"ValueError('boom')"` -> `"ValueError"`.

    Celery's `exception` field is a safe_repr, usually `Class(args)`. Some failures repr
    differently (`Reject` as `reject requeue=False: ...`; a hard time limit in Celery 5.7 as
    `ExceptionWithTraceback()`), and then the traceback's closing `module.Class: message` line
    names the real class.
    """
    if isinstance(exception, str):
        match = _CALL_REPR.match(exception)
        if match and match.group(1) not in _WRAPPERS:
            return match.group(1).rpartition(".")[2]
    if isinstance(traceback, str):
        for line in reversed(traceback.rstrip().splitlines()[-5:]):
            match = _TRACEBACK_TAIL.match(line)
            if match:
                return match.group(1).rpartition(".")[2]
    return UNKNOWN_LABEL


class Tracker:
    """Metric state built from events; `handle()` one event dict at a time."""

    def __init__(
        self,
        limits: Limits | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] | None = None,
    ) -> None:
        self.limits = limits or Limits()
        #: Wall time, only for the timestamps we export.
        self.clock = clock
        #: Deadlines, grace periods and liveness: immune to the wall clock stepping. An injected
        #: `clock` (tests) drives both unless a `monotonic` is given too.
        self.monotonic = monotonic or (time.monotonic if clock is time.time else clock)
        self.buckets = tuple(sorted(self.limits.buckets))
        self.task_names = LabelLimiter(self.limits.max_task_names)
        self.exceptions = LabelLimiter(self.limits.max_exceptions)
        self.queues = LabelLimiter(self.limits.max_queues)
        self.event_types = LabelLimiter(len(KNOWN_EVENT_TYPES))
        self.event_types.values.update((t, t) for t in KNOWN_EVENT_TYPES)

        self.task_counts: dict[str, dict[LabelKey, int]] = {t: {} for t in _BIT}
        self.runtime: dict[LabelKey, Histogram] = {}
        self.queue_wait: dict[LabelKey, Histogram] = {}
        self.latency: dict[LabelKey, Histogram] = {}

        self.inflight: OrderedDict[str, TaskRecord] = OrderedDict()
        self.finished: OrderedDict[str, TaskRecord] = OrderedDict()
        self.workers: dict[str, WorkerRecord] = {}
        #: uuid -> (deadline, record) for tasks whose events are parked waiting for task-sent.
        self.waiting: OrderedDict[str, tuple[float, TaskRecord]] = OrderedDict()
        #: When the last task-sent arrived; parking only makes sense while producers send them,
        #: which is assumed at startup until 5 minutes pass without one.
        self.last_sent_at = self.monotonic()
        #: Queue names seen in task-sent events, for the queue length probe.
        self.seen_queues: set[str] = set()

        self.events_by_type: dict[str, int] = {}
        self.malformed: dict[str, int] = {}
        self.duplicates: dict[str, int] = {}
        self.negative_durations: dict[str, int] = {}
        self.evicted = 0
        self.workers_overflow = 0
        self.last_event_at = 0.0

        self._handlers: dict[str, Callable[[Event], None]] = {
            "task-sent": self._on_sent,
            "task-received": self._on_received,
            "task-started": self._on_started,
            "task-succeeded": self._on_succeeded,
            "task-failed": self._on_failed,
            "task-retried": self._on_retried,
            "task-revoked": self._on_revoked,
            "task-rejected": self._on_rejected,
            "worker-online": self._on_worker_online,
            "worker-heartbeat": self._on_worker_heartbeat,
            "worker-offline": self._on_worker_offline,
        }

    # -- entry points -------------------------------------------------------------------------

    def handle(self, event: Event) -> None:
        kind = self.event_types(event.get("type"))
        self.events_by_type[kind] = self.events_by_type.get(kind, 0) + 1
        self.last_event_at = self.clock()
        now = self.monotonic()
        if self.waiting:
            self.release_expired(now)
        handler = self._handlers.get(kind)
        if handler is None:
            return
        try:
            if kind == "task-sent":
                self.last_sent_at = now
                handler(event)
                parked = self.waiting.pop(event.get("uuid"), None)  # type: ignore[arg-type]
                if parked is not None:
                    self._replay(parked[1])
            elif not (kind in _BIT and self._park(event, now)):
                handler(event)
        except Exception:
            # Whatever an event holds (a list for a name, 1e400 for a runtime) costs that event
            # only: counted, skipped, and the stream goes on.
            self.count_malformed("bad_field")

    def _park(self, event: Event, now: float) -> bool:
        """Hold a worker-side event back while its task's task-sent may still be on the way.

        The producer publishes task-sent just after the task message, so a quick worker's
        task-received (and more) often reaches us first; counting it at once would label it
        `queue_name="unknown"`. While the cluster's producers send task-sent events, a task's
        events wait up to `sent_grace` for it, then are counted with what is known.
        """
        if now - self.last_sent_at > SENT_EVENTS_ABSENT_AFTER:
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
            record = self._record(event)
            if record is None:
                return False
        elif record.queue is not None or record.seen & 1:
            return False
        if record.pending is None:
            record.pending = []
            self.waiting[uuid] = (now + self.limits.sent_grace, record)
        record.pending.append(event)
        return True

    def _replay(self, record: TaskRecord) -> None:
        pending, record.pending = record.pending or [], None
        for event in pending:
            try:
                self._handlers[event["type"]](event)
            except Exception:  # as in handle(): one bad event costs only itself
                self.count_malformed("bad_field")

    def release_expired(self, now: float | None = None) -> None:
        """Count parked events whose task-sent did not come within the grace period."""
        now = self.monotonic() if now is None else now
        while self.waiting:
            uuid, (deadline, record) = next(iter(self.waiting.items()))
            if deadline > now:
                break
            del self.waiting[uuid]
            self._replay(record)

    def handle_all(self, events: Iterable[Event]) -> None:
        for event in events:
            self.handle(event)

    def count_malformed(self, reason: str) -> None:
        self.malformed[reason] = self.malformed.get(reason, 0) + 1

    # -- task events --------------------------------------------------------------------------

    def _record(self, event: Event) -> TaskRecord | None:
        """The record for the event's uuid, created (and the table bounded) if new."""
        uuid = event.get("uuid")
        if not isinstance(uuid, str) or not uuid:
            self.count_malformed("missing_uuid")
            return None
        record = self.inflight.get(uuid)
        if record is None and (record := self.finished.get(uuid)) is not None:
            bit = _BIT.get(event.get("type"), 0)  # type: ignore[arg-type]
            if bit & _STARTS_RUN and record.seen & bit:
                # A finished task's id sent or received again: a new run under a reused id
                # (apply_async(task_id=...)), not a duplicate of the old run's event.
                del self.finished[uuid]
                record = None
        if record is None:
            record = self.inflight[uuid] = TaskRecord()
            if len(self.inflight) > self.limits.max_tracked_tasks:
                self.inflight.popitem(last=False)
                self.evicted += 1
        return record

    def _finish(self, event: Event) -> None:
        uuid = event["uuid"]
        record = self.inflight.pop(uuid, None)
        if record is not None:
            self.finished[uuid] = record
            if len(self.finished) > self.limits.max_finished_tasks:
                self.finished.popitem(last=False)

    def _first(self, record: TaskRecord, kind: str) -> bool:
        """Mark `kind` seen in this attempt; False (and counted) if it already was."""
        bit = _BIT[kind]
        if record.seen & bit:
            self.duplicates[kind] = self.duplicates.get(kind, 0) + 1
            return False
        record.seen |= bit
        return True

    def _maybe_new_attempt(self, record: TaskRecord, event: Event) -> None:
        retries = event.get("retries")
        if isinstance(retries, int) and retries != record.retries:
            record.new_attempt(retries)

    def _labels(self, record: TaskRecord) -> LabelKey:
        return (record.name or UNKNOWN_LABEL, record.queue or UNKNOWN_LABEL)

    def _count(self, kind: str, key: LabelKey) -> None:
        counts = self.task_counts[kind]
        counts[key] = counts.get(key, 0) + 1

    def _observe(self, table: dict[LabelKey, Histogram], key: LabelKey, value: float) -> None:
        if not math.isfinite(value):
            self.count_malformed("non_finite")
            return
        hist = table.get(key)
        if hist is None:
            hist = table[key] = Histogram(len(self.buckets))
        hist.counts[bisect_left(self.buckets, value)] += 1
        hist.sum += value

    def _duration(self, metric: str, value: float) -> float:
        if value < 0:
            self.negative_durations[metric] = self.negative_durations.get(metric, 0) + 1
            return 0.0
        return value

    def _due(self, record: TaskRecord) -> float | None:
        """When the task became due: sent (else received), or its ETA if that is later."""
        base = record.sent if record.sent is not None else record.received
        if base is not None and record.eta is not None and record.eta > base:
            return record.eta
        return base

    def _observe_wait(self, record: TaskRecord) -> None:
        if record.waited or record.started is None:
            return
        due = self._due(record)
        if due is None:
            return
        record.waited = True
        wait = self._duration("queue_wait", record.started - due)
        self._observe(self.queue_wait, self._labels(record), wait)

    def _observe_end(self, record: TaskRecord, event: Event, outcome: str) -> None:
        finished_at = event.get("timestamp")
        if not isinstance(finished_at, (int, float)):
            return
        key = self._labels(record)
        runtime = event.get("runtime") if outcome == "succeeded" else None
        if not isinstance(runtime, (int, float)) and record.started is not None:
            runtime = finished_at - record.started
        if isinstance(runtime, (int, float)):
            self._observe(self.runtime, (*key, outcome), self._duration("runtime", runtime))
        due = self._due(record)
        if due is not None:
            self._observe(self.latency, key, self._duration("latency", finished_at - due))

    @staticmethod
    def _timestamp(event: Event) -> float | None:
        value = event.get("timestamp")
        return value if isinstance(value, (int, float)) else None

    def _learn(self, record: TaskRecord, event: Event) -> None:
        """Take the name (and ETA) from an event that carries them."""
        if "name" in event:
            record.name = self.task_names(event["name"])
        eta = event.get("eta")
        if eta is not None:
            record.eta = parse_eta(eta)

    def _on_sent(self, event: Event) -> None:
        record = self._record(event)
        if record is None:
            return
        self._maybe_new_attempt(record, event)
        if not self._first(record, "task-sent"):
            return
        self._learn(record, event)
        queue = event.get("queue")
        if isinstance(queue, str) and queue:
            record.queue = self.queues(queue)
            if record.queue == queue:
                self.seen_queues.add(queue)
        record.sent = self._timestamp(event)
        self._count("task-sent", self._labels(record))
        self._observe_wait(record)  # task-sent can arrive after task-started

    def _on_received(self, event: Event) -> None:
        record = self._record(event)
        if record is None:
            return
        self._maybe_new_attempt(record, event)
        if not self._first(record, "task-received"):
            return
        self._learn(record, event)
        record.received = self._timestamp(event)
        self._count("task-received", self._labels(record))
        self._observe_wait(record)

    def _on_started(self, event: Event) -> None:
        record = self._record(event)
        if record is None or not self._first(record, "task-started"):
            return
        record.started = self._timestamp(event)
        self._count("task-started", self._labels(record))
        self._observe_wait(record)

    def _on_succeeded(self, event: Event) -> None:
        record = self._record(event)
        if record is None or not self._first(record, "task-succeeded"):
            return
        self._count("task-succeeded", self._labels(record))
        self._finish(event)  # before observing: a bad runtime must not leave it in flight
        self._observe_end(record, event, "succeeded")

    def _on_failed(self, event: Event) -> None:
        record = self._record(event)
        if record is None or not self._first(record, "task-failed"):
            return
        exception = event.get("exception")
        if record.name is None and isinstance(exception, str):
            unknown = _NOT_REGISTERED.match(exception)
            if unknown:  # an unknown task's only event: its name is in the exception
                record.name = self.task_names(unknown.group(2))
        name, queue = self._labels(record)
        self._count(
            "task-failed",
            (name, queue, self.exceptions(exception_class(exception, event.get("traceback")))),
        )
        self._finish(event)
        self._observe_end(record, event, "failed")

    def _on_retried(self, event: Event) -> None:
        record = self._record(event)
        if record is None or not self._first(record, "task-retried"):
            return
        # No reset here: in prefork the retry's task-sent/-received (retries + 1, published by
        # the pool child) usually arrive before this event (sent by the main process).
        self._count("task-retried", self._labels(record))

    def _on_revoked(self, event: Event) -> None:
        record = self._record(event)
        if record is None or not self._first(record, "task-revoked"):
            return
        self._count("task-revoked", self._labels(record))
        self._finish(event)

    def _on_rejected(self, event: Event) -> None:
        record = self._record(event)
        if record is None or not self._first(record, "task-rejected"):
            return
        self._count("task-rejected", self._labels(record))
        if not event.get("requeue"):
            self._finish(event)

    # -- worker events ------------------------------------------------------------------------

    def _worker(self, event: Event) -> WorkerRecord | None:
        hostname = event.get("hostname")
        if not isinstance(hostname, str) or not hostname:
            self.count_malformed("missing_hostname")
            return None
        now = self.monotonic()
        worker = self.workers.get(hostname)
        if worker is None:
            if len(self.workers) >= self.limits.max_workers:
                self.workers_overflow += 1
                return None
            worker = self.workers[hostname] = WorkerRecord(now)
        worker.last_seen = now
        worker.last_seen_at = self.clock()
        active, processed = event.get("active"), event.get("processed")
        if isinstance(active, int):
            worker.active = active
        if isinstance(processed, int):
            worker.processed = processed
        return worker

    def _on_worker_online(self, event: Event) -> None:
        worker = self._worker(event)
        if worker is not None:
            worker.offline_at = None

    def _on_worker_heartbeat(self, event: Event) -> None:
        self._on_worker_online(event)

    def _on_worker_offline(self, event: Event) -> None:
        worker = self._worker(event)
        if worker is not None:
            worker.offline_at = worker.last_seen
            worker.active = 0

    # -- read side (the collector calls these with the lock held) --------------------------

    def worker_views(self) -> list[WorkerView]:
        """Liveness as of now; drops workers that have been down for the retention period."""
        now = self.monotonic()
        self.release_expired(now)
        timeout, retention = self.limits.worker_timeout, self.limits.worker_retention
        views = []
        for hostname, worker in list(self.workers.items()):
            down_since = worker.offline_at
            if down_since is None and now - worker.last_seen > timeout:
                down_since = worker.last_seen + timeout
            if down_since is not None and now - down_since > retention:
                del self.workers[hostname]
                continue
            up = down_since is None
            views.append(
                WorkerView(
                    hostname, up, worker.active if up else 0, worker.processed, worker.last_seen_at
                )
            )
        return views

    def label_overflows(self) -> dict[str, int]:
        return {
            "name": self.task_names.overflow,
            "exception": self.exceptions.overflow,
            "queue_name": self.queues.overflow,
            "hostname": self.workers_overflow,
            "type": self.event_types.overflow,
        }
