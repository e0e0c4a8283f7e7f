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

from . import fields
from .aggregates import clean_label
from .selfstats import ExporterStats

WorkerState = Literal["online", "offline", "lost"]

#: Counts from heartbeats beyond this are not believed (and would not survive a float anyway).
_MAX_COUNT = 2**53
#: A load average beyond this is not believed (a machine with a million runnable threads).
_MAX_LOAD = 1e6

#: What a worker says it runs (`sw_ident`, `sw_ver`, `sw_sys`): "py-celery", "5.5.3", "Linux".
Software = tuple[str, str, str]
_UNKNOWN_SOFTWARE: Software = ("unknown", "unknown", "unknown")


def _count(value: object) -> int | None:
    return value if type(value) is int and 0 <= value <= _MAX_COUNT else None


def _load(value: object) -> tuple[float, float, float] | None:
    """Heartbeats' `loadavg`: three numbers (1, 5 and 15 minutes), else None."""
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        return None
    loads = []
    for item in value:
        if type(item) not in (int, float) or not 0 <= item <= _MAX_LOAD:
            return None
        loads.append(float(item))
    return (loads[0], loads[1], loads[2])


def _software(event: dict[str, Any], known: Software | None) -> Software | None:
    fields = (event.get("sw_ident"), event.get("sw_ver"), event.get("sw_sys"))
    if not any(isinstance(field, str) and field for field in fields):
        return known
    return tuple(  # type: ignore[return-value]
        clean_label(field)[0] if isinstance(field, str) and field else "unknown" for field in fields
    )


class WorkerRecord:
    __slots__ = (
        "active",
        "gone_reported",
        "last_seen",
        "last_seen_at",
        "load",
        "offline_at",
        "processed",
        "software",
        "starting",
    )

    def __init__(self, now: float) -> None:
        self.last_seen = now  # monotonic: liveness arithmetic
        self.last_seen_at = 0.0  # wall time: the exported timestamp
        self.active = 0
        self.processed = 0
        self.offline_at: float | None = None  # monotonic time of its worker-offline
        self.load: tuple[float, float, float] | None = None
        self.software: Software | None = None
        #: What it held was taken out (lost, or offline for good); reset when it is heard again.
        self.gone_reported = False
        #: Came online and has not sent a heartbeat since.
        self.starting = False


@dataclass(frozen=True)
class WorkerView:
    hostname: str
    state: WorkerState
    active: int
    processed: int
    last_seen: float  # wall time of its last event
    software: Software = _UNKNOWN_SOFTWARE
    load: tuple[float, float, float] | None = None  # while it is up

    @property
    def up(self) -> bool:
        return self.state == "online"


class WorkerListener:
    """Told what happens to workers, by hostname as the worker table labels it: the task side
    (`occupancy.Occupancy`) takes out what a worker that went away held. Does nothing here."""

    def worker_offline(self, hostname: str) -> None:
        """It said goodbye: what it prefetched goes back to the broker; running tasks finish."""

    def worker_gone(self, hostname: str, lost: bool) -> None:
        """Nothing it held runs any more: it is lost (died), or offline for good."""

    def worker_back(self, hostname: str) -> None:
        """Heard from again after it went offline or was given up on."""

    def worker_idle(self, hostname: str, at: float) -> None:
        """Its heartbeat at `at` (its own clock) says it runs no task."""

    def worker_forgotten(self, hostname: str) -> None:
        """Its record is dropped (down past the retention, or evicted to make room)."""


class WorkerTable:
    def __init__(
        self,
        stats: ExporterStats,
        clock: Callable[[], float],
        monotonic: Callable[[], float],
        max_workers: int,
        timeout: float,
        retention: float,
        listener: WorkerListener | None = None,
    ) -> None:
        self.stats = stats
        self.listener = listener or WorkerListener()
        self.clock = clock
        self.monotonic = monotonic
        self.max_workers = max_workers
        self.timeout = timeout
        self.retention = retention
        self.records: dict[str, WorkerRecord] = {}
        #: Called when a worker that came online sends its first heartbeat. Its worker-online
        #: goes out before it listens for remote control, its heartbeats once it does: from
        #: then on a broadcast (`enable_events`, for a worker started without -E) reaches it.
        self.on_started: Callable[[], None] | None = None
        #: Liveness as of the last `tick()`, in hostname order of arrival.
        self.views: list[WorkerView] = []
        #: Monotonic time the event stream stopped (the broker connection was lost), if it is
        #: stopped: liveness stands still meanwhile (a broker outage is not a worker outage).
        self.paused_at: float | None = None

    # -- events -------------------------------------------------------------------------------

    def seen(self, event: dict[str, Any]) -> tuple[str, WorkerRecord] | None:
        """The sender's label and record, refreshed by this event (None: no usable hostname,
        or the table is full)."""
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
        load = _load(event.get("loadavg"))
        if load is not None:
            worker.load = load
        worker.software = _software(event, worker.software)
        return hostname, worker

    def on_heartbeat(self, event: dict[str, Any]) -> None:
        seen = self.seen(event)
        if seen is None:
            return
        hostname, worker = seen
        self._alive(hostname, worker)
        if worker.starting:
            worker.starting = False
            if self.on_started is not None:
                self.on_started()
        if _count(event.get("active")) == 0:
            at = fields.timestamp(event.get("timestamp"))
            if at is not None:
                self.listener.worker_idle(hostname, at)

    def on_online(self, event: dict[str, Any]) -> None:
        """A worker starting. One we knew that was neither offline nor given up on restarted
        without saying goodbye (killed and started again within the timeout): what it held
        died with it."""
        hostname = event.get("hostname")
        known = self.records.get(clean_label(hostname)[0]) if isinstance(hostname, str) else None
        restarted = known is not None and known.offline_at is None and not known.gone_reported
        seen = self.seen(event)
        if seen is None:
            return
        label, worker = seen
        if restarted:
            self.listener.worker_gone(label, True)
            worker.gone_reported = True
        worker.starting = True
        self._alive(label, worker)

    def on_offline(self, event: dict[str, Any]) -> None:
        seen = self.seen(event)
        if seen is not None:
            hostname, worker = seen
            worker.offline_at = worker.last_seen
            worker.active = 0
            self.listener.worker_offline(hostname)

    def _alive(self, hostname: str, worker: WorkerRecord) -> None:
        if worker.offline_at is not None or worker.gone_reported:
            self.listener.worker_back(hostname)
        worker.offline_at = None
        worker.gone_reported = False

    # -- the event stream -------------------------------------------------------------------

    def pause(self, now: float) -> None:
        """The event stream stopped: no news is not bad news until it flows again."""
        if self.paused_at is None:
            self.paused_at = now

    def resume(self, now: float) -> None:
        """The stream flows again: every worker gets the time it was down back."""
        if self.paused_at is None:
            return
        gap = max(0.0, now - self.paused_at)
        self.paused_at = None
        for worker in self.records.values():
            worker.last_seen += gap
            if worker.offline_at is not None:
                worker.offline_at += gap

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
        self._forget(oldest[1], now)
        self.stats.workers_evicted += 1
        return True

    def _forget(self, hostname: str, now: float) -> None:
        """Drop a down worker's record; what it still held goes with it."""
        worker = self.records.pop(hostname)
        if not worker.gone_reported:
            self.listener.worker_gone(hostname, self._down_since(worker, now)[0] == "lost")
        self.listener.worker_forgotten(hostname)

    # -- time ---------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Work out liveness as of `now` (or as of the stream's stop, while it is stopped);
        forget workers down for longer than the retention. A worker lost, or offline for longer
        than the timeout (not a consumer restart, which is back within seconds), no longer runs
        anything."""
        if self.paused_at is not None:
            now = min(now, self.paused_at)
        views = []
        for hostname, worker in list(self.records.items()):
            state, down_since = self._down_since(worker, now)
            gone = down_since is not None and (state == "lost" or now - down_since > self.timeout)
            if gone and not worker.gone_reported:
                worker.gone_reported = True
                self.listener.worker_gone(hostname, state == "lost")
            if down_since is not None and now - down_since > self.retention:
                self._forget(hostname, now)
                continue
            up = state == "online"
            views.append(
                WorkerView(
                    hostname,
                    state,
                    worker.active if up else 0,
                    worker.processed,
                    worker.last_seen_at,
                    worker.software or _UNKNOWN_SOFTWARE,
                    worker.load if up else None,
                )
            )
        self.views = views
