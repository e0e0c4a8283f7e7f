"""The worker table: which workers exist, and whether each is online, shut down or lost.

A worker that says goodbye (`worker-offline`: a warm shutdown, a scale-in, a deploy) is
`offline`; one that stops sending heartbeats without it (SIGKILL, OOM, a lost node or network)
is `lost`. Only the second is an incident, so the metrics keep them apart. Liveness uses the
monotonic clock (immune to wall-clock steps); the exported timestamp is wall time.
The table is bounded: when full, a worker that is down makes room for a new one before a live
worker is ever refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from .aggregates import clean_label
from .selfstats import ExporterStats

WorkerState = Literal["online", "offline", "lost"]

#: Counts from heartbeats beyond this are not believed (and would not survive a float anyway).
_MAX_COUNT = 2**53


def _count(value: object) -> int | None:
    return value if type(value) is int and 0 <= value <= _MAX_COUNT else None


class WorkerRecord:
    __slots__ = ("active", "last_seen", "last_seen_at", "offline_at", "processed")

    def __init__(self, now: float) -> None:
        self.last_seen = now  # monotonic: liveness arithmetic
        self.last_seen_at = 0.0  # wall time: the exported timestamp
        self.active = 0
        self.processed = 0
        self.offline_at: float | None = None  # monotonic time of its worker-offline


@dataclass(frozen=True)
class WorkerView:
    hostname: str
    state: WorkerState
    active: int
    processed: int
    last_seen: float  # wall time of its last event

    @property
    def up(self) -> bool:
        return self.state == "online"


class WorkerTable:
    def __init__(
        self,
        stats: ExporterStats,
        clock: Callable[[], float],
        monotonic: Callable[[], float],
        max_workers: int,
        timeout: float,
        retention: float,
    ) -> None:
        self.stats = stats
        self.clock = clock
        self.monotonic = monotonic
        self.max_workers = max_workers
        self.timeout = timeout
        self.retention = retention
        self.records: dict[str, WorkerRecord] = {}
        #: Liveness as of the last `tick()`, in hostname order of arrival.
        self.views: list[WorkerView] = []

    # -- events -------------------------------------------------------------------------------

    def seen(self, event: dict[str, Any]) -> WorkerRecord | None:
        """The sender's record, refreshed by this event (None: no usable hostname, or full)."""
        hostname = event.get("hostname")
        if not isinstance(hostname, str) or not hostname:
            self.stats.count_malformed("missing_hostname")
            return None
        hostname, cut = clean_label(hostname)
        if cut:
            self.stats.hostnames_truncated += 1
        now = self.monotonic()
        worker = self.records.get(hostname)
        if worker is None:
            if len(self.records) >= self.max_workers and not self._evict_one_down(now):
                self.stats.workers_overflow += 1
                return None
            worker = self.records[hostname] = WorkerRecord(now)
        worker.last_seen = now
        worker.last_seen_at = self.clock()
        active, processed = _count(event.get("active")), _count(event.get("processed"))
        if active is not None:
            worker.active = active
        if processed is not None:
            worker.processed = processed
        return worker

    def on_online(self, event: dict[str, Any]) -> None:
        worker = self.seen(event)
        if worker is not None:
            worker.offline_at = None

    def on_offline(self, event: dict[str, Any]) -> None:
        worker = self.seen(event)
        if worker is not None:
            worker.offline_at = worker.last_seen
            worker.active = 0

    def _down_since(self, worker: WorkerRecord, now: float) -> tuple[WorkerState, float | None]:
        if worker.offline_at is not None:
            return "offline", worker.offline_at
        if now - worker.last_seen > self.timeout:
            return "lost", worker.last_seen + self.timeout
        return "online", None

    def _evict_one_down(self, now: float) -> bool:
        """Drop the worker that has been down longest; False if every worker is online."""
        oldest: tuple[float, str] | None = None
        for hostname, worker in self.records.items():
            since = self._down_since(worker, now)[1]
            if since is not None and (oldest is None or since < oldest[0]):
                oldest = (since, hostname)
        if oldest is None:
            return False
        del self.records[oldest[1]]
        self.stats.workers_evicted += 1
        return True

    # -- time ---------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Work out liveness as of `now`; forget workers down for longer than the retention."""
        views = []
        for hostname, worker in list(self.records.items()):
            state, down_since = self._down_since(worker, now)
            if down_since is not None and now - down_since > self.retention:
                del self.records[hostname]
                continue
            up = state == "online"
            active = worker.active if up else 0
            views.append(WorkerView(hostname, state, active, worker.processed, worker.last_seen_at))
        self.views = views
