"""Turn Celery event dicts into metric state. Pure logic: no I/O, no locks, the clock is injected.

The tracker dispatches each event by type (one table, `vocabulary`) to the object it is about:
the task table (`tasks`: counting and measuring, by attempt and delivery), the worker table
(`workers`: online, offline or lost), and the exporter's account of itself (`selfstats`). The
counters and histograms a scrape renders live in `aggregates`.

Readers (the collector) call `tick(now)` once per scrape, the only place time moves state on
(parked events released, liveness worked out, long-gone workers forgotten), then read a typed
`TrackerView` of the tables; they never change them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .aggregates import Histogram, LabelKey, LabelLimiter, TaskMetrics
from .config import Limits
from .metrics import BucketLayout
from .occupancy import Gauges
from .selfstats import ExporterStats
from .tasks import TaskTable
from .vocabulary import KNOWN_EVENT_TYPES, TASK_EVENTS
from .workers import WorkerTable, WorkerView

Event = dict[str, Any]


@dataclass(frozen=True)
class TrackerView:
    """What a scrape reads, as of the last `tick()`. Valid while the tracker's lock is held."""

    buckets: BucketLayout
    task_counts: Mapping[str, Mapping[LabelKey, int]]
    runtime: Mapping[LabelKey, Histogram]
    queue_wait: Mapping[LabelKey, Histogram]
    latency: Mapping[LabelKey, Histogram]
    #: Task name -> Unix time of its latest task-sent / task-succeeded / task-failed.
    last_at: Mapping[str, Mapping[str, float]]
    #: Per (name, queue_name): tasks running now, and tasks received but not started (due).
    running: Gauges
    waiting: Gauges
    #: Per hostname (as the events say it): tasks waiting to start there.
    reserved: Mapping[object, int]
    #: Per (name, queue_name): tasks held by a worker when it was lost or restarted.
    worker_lost: Mapping[LabelKey, int]
    #: The wall time the ages above are measured at (the last tick).
    now: float
    workers: Sequence[WorkerView]
    events_by_type: Mapping[str, int]
    malformed: Mapping[str, int]
    duplicates: Mapping[str, int]
    negative_durations: Mapping[str, int]
    unmeasured: Mapping[tuple[str, str], int]
    label_overflows: Mapping[str, int]
    label_truncations: Mapping[str, int]
    tasks_tracked: int
    tasks_evicted: int
    workers_evicted: int
    last_event_at: float


class Tracker:
    """Metric state built from events; `handle()` one event dict at a time."""

    def __init__(
        self,
        limits: Limits | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] | None = None,
    ) -> None:
        self.limits = limits = limits or Limits()
        #: Wall time, only for the timestamps we export.
        self.clock = clock
        #: Deadlines, grace periods and liveness: immune to the wall clock stepping. An injected
        #: `clock` (tests) drives both unless a `monotonic` is given too.
        self.monotonic = monotonic or (time.monotonic if clock is time.time else clock)
        self.stats = ExporterStats()
        self.event_types = LabelLimiter(len(KNOWN_EVENT_TYPES), preset=KNOWN_EVENT_TYPES)
        self.metrics = TaskMetrics(
            limits.buckets, limits.max_task_names, limits.max_queues, limits.max_exceptions
        )
        self.tasks = TaskTable(
            self.metrics,
            self.stats,
            max_tracked=limits.max_tracked_tasks,
            max_finished=limits.max_finished_tasks,
            sent_grace=limits.sent_grace,
            skew_tolerance=limits.skew_tolerance,
            now=self.monotonic(),
        )
        self.workers = WorkerTable(
            self.stats,
            self.clock,
            self.monotonic,
            limits.max_workers,
            limits.worker_timeout,
            limits.worker_retention,
            listener=self.tasks.occupancy,
        )
        self._worker_handlers: dict[str, Callable[[Event], Any]] = {
            "worker-online": self.workers.on_online,
            "worker-heartbeat": self.workers.on_heartbeat,
            "worker-offline": self.workers.on_offline,
        }
        self._ticked_at = 0.0

    # -- writing ------------------------------------------------------------------------------

    def handle(self, event: Event) -> None:
        self.handle_all((event,))

    def handle_all(self, events: Iterable[Event]) -> None:
        """Handle a batch (a message's events): the clocks are read once for all of them."""
        wall, now = self.clock(), self.monotonic()
        stats, tasks, worker_handlers = self.stats, self.tasks, self._worker_handlers
        by_type, event_types = stats.events_by_type, self.event_types
        known = event_types.values  # the limiter's own table: its fast path, without a call
        tasks.begin(now, wall)
        for event in events:
            kind = event.get("type")
            kind = (type(kind) is str and known.get(kind)) or event_types(kind)
            by_type[kind] = by_type.get(kind, 0) + 1
            stats.last_event_at = wall
            try:
                if kind in TASK_EVENTS:
                    tasks.handle(kind, event)
                elif (handler := worker_handlers.get(kind)) is not None:
                    handler(event)
            except Exception:
                # Whatever an event holds (a list for a name, 1e400 for a runtime) costs that
                # event only: counted, skipped, and the stream goes on.
                stats.count_malformed("bad_field")

    def count_malformed(self, reason: str) -> None:
        self.stats.count_malformed(reason)

    def stream_stopped(self) -> None:
        """The event stream stopped (the broker connection was lost): until it flows again,
        silence says nothing about the workers, so their liveness stands still."""
        self.workers.pause(self.monotonic())

    def stream_resumed(self) -> None:
        self.workers.resume(self.monotonic())

    def tick(self, now: float | None = None) -> None:
        """Let time pass: release parked events whose grace is over, let tasks whose ETA came
        start waiting, work out worker liveness (a lost worker's tasks stop running)."""
        now = self.monotonic() if now is None else now
        self._ticked_at = self.clock()
        self.tasks.tick(now, self._ticked_at)
        self.workers.tick(now)

    # -- reading ------------------------------------------------------------------------------

    @property
    def seen_queues(self) -> set[str]:
        return self.tasks.seen_queues

    def view(self) -> TrackerView:
        metrics, stats = self.metrics, self.stats
        overflows = metrics.label_overflows()
        overflows["hostname"] = stats.workers_overflow
        overflows["type"] = self.event_types.overflow
        truncations = metrics.label_truncations()
        truncations["hostname"] = stats.hostnames_truncated
        occupancy = self.tasks.occupancy
        return TrackerView(
            buckets=metrics.buckets,
            task_counts=metrics.counts,
            runtime=metrics.runtime,
            queue_wait=metrics.queue_wait,
            latency=metrics.latency,
            last_at=metrics.last_at,
            running=occupancy.gauges(occupancy.running),
            waiting=occupancy.gauges(occupancy.waiting),
            reserved=occupancy.waiting_by_host(),
            worker_lost=occupancy.lost,
            now=self._ticked_at,
            workers=self.workers.views,
            events_by_type=stats.events_by_type,
            malformed=stats.malformed,
            duplicates=stats.duplicates,
            negative_durations=stats.negative_durations,
            unmeasured=stats.unmeasured,
            label_overflows=overflows,
            label_truncations=truncations,
            tasks_tracked=len(self.tasks.inflight),
            tasks_evicted=stats.tasks_evicted,
            workers_evicted=stats.workers_evicted,
            last_event_at=stats.last_event_at,
        )
