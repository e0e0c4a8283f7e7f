"""What the workers hold right now: tasks running and tasks waiting to start, with their ages.

A delivery (one task-received, `records.Delivery`) is in one place at a time:

- *scheduled*: received with an ETA/countdown still in the future; the worker holds it on a
  timer. Not waiting yet: it became due at its ETA, not at its receipt.
- *waiting*: received (prefetched, reserved) and due, not started: `celery_task_waiting`.
- *running*: started, not ended: `celery_task_active`.
- nowhere: ended, or its task finished, or its worker went away.

The places are kept as the events arrive (a dict insert or delete per delivery step), so a
scrape reads only what is running and waiting, not the whole in-flight table. Ages are measured
from the events' own timestamps (when the worker started the task, when it was received or
due) against the exporter's wall clock, so a scrape long after the last event still sees them
grow.

When a worker goes away, what it held goes nowhere (the worker table says when, through the
`WorkerListener` methods below). A worker-offline hands its prefetched tasks back to the broker
at once; its running tasks finish, or, if the worker is not back within the worker timeout (a
consumer restart after a broker hiccup sends offline then online and keeps running its tasks),
are taken out. A worker declared lost (no heartbeat) and one that comes online again under the
same name without having said goodbye (killed and restarted) lose everything they held, counted
per task name: those tasks died with their worker, or will be delivered again (acks_late, or
Redis' visibility timeout). A heartbeat saying the worker runs nothing takes out what we still
thought it ran (an event that never came). Until a gone worker is heard from again, nothing of
it is placed.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass

from .aggregates import LabelKey
from .metrics import UNKNOWN_LABEL
from .records import Delivery, TaskRecord
from .workers import WorkerListener

NOWHERE, SCHEDULED, WAITING, RUNNING = 0, 1, 2, 3

#: Entries in the ETA heap whose delivery moved on are dropped lazily; when they outnumber the
#: live ones by this factor (plus a floor) the heap is rebuilt, so it stays bounded.
_HEAP_SLACK = 2
_HEAP_FLOOR = 1024


@dataclass
class Gauges:
    """Count and oldest start ("since", wall time) per (name, queue_name) for one place."""

    counts: dict[LabelKey, int]
    oldest: dict[LabelKey, float]


def _key(record: TaskRecord, delivery: Delivery) -> LabelKey:
    return (record.name or UNKNOWN_LABEL, record.queue_of(delivery.retries) or UNKNOWN_LABEL)


class Occupancy(WorkerListener):
    def __init__(self) -> None:
        self.running: dict[Delivery, TaskRecord] = {}
        self.waiting: dict[Delivery, TaskRecord] = {}
        #: (eta, tie-breaker, delivery, record): deliveries held until their ETA.
        self._scheduled: list[tuple[float, int, Delivery, TaskRecord]] = []
        self.scheduled = 0
        self._order = itertools.count()
        #: hostname as the events say it -> the deliveries held there, in any place.
        self.by_host: dict[object, dict[Delivery, TaskRecord]] = {}
        #: (name, queue_name) -> deliveries held by a worker when it was lost or restarted.
        self.lost: dict[LabelKey, int] = {}
        #: Workers gone (offline, lost) and not heard from since: nothing of theirs is placed.
        self.gone: set[object] = set()

    # -- a delivery's steps ---------------------------------------------------------------------

    def received(self, record: TaskRecord, delivery: Delivery, wall: float) -> None:
        if self.gone and delivery.host in self.gone:
            return  # a late event of a worker that went away: it does not hold this any more
        eta, seen = delivery.eta, delivery.received
        since = seen if seen is not None else wall
        if eta is not None and eta > wall:
            delivery.place = SCHEDULED
            delivery.since = eta
            heapq.heappush(self._scheduled, (eta, next(self._order), delivery, record))
            self.scheduled += 1
        else:
            delivery.place = WAITING
            delivery.since = eta if eta is not None and eta > since else since
            self.waiting[delivery] = record
        self._hold(delivery, record)

    def _hold(self, delivery: Delivery, record: TaskRecord) -> None:
        held = self.by_host.get(delivery.host)
        if held is None:
            held = self.by_host[delivery.host] = {}
        held[delivery] = record

    def started(self, record: TaskRecord, delivery: Delivery, wall: float) -> None:
        """The delivery runs (also one taken out of place by a lost worker that came back)."""
        place = delivery.place
        if place == RUNNING or record.final or delivery.end:
            return
        if place == NOWHERE:  # its worker was given up on, and still runs it
            if self.gone and delivery.host in self.gone:
                return  # a late event from before it went away
            self._hold(delivery, record)
        else:
            self._leave(delivery)
        delivery.place = RUNNING
        delivery.since = delivery.started if delivery.started is not None else wall
        self.running[delivery] = record

    def ended(self, delivery: Delivery) -> None:
        if delivery.place == NOWHERE:
            return
        self._leave(delivery)
        held = self.by_host.get(delivery.host)
        if held is not None:
            held.pop(delivery, None)
            if not held:
                del self.by_host[delivery.host]

    def _leave(self, delivery: Delivery) -> None:
        place = delivery.place
        if place == WAITING:
            del self.waiting[delivery]
        elif place == RUNNING:
            del self.running[delivery]
        elif place == SCHEDULED:
            self.scheduled -= 1  # its heap entry is skipped when it surfaces
        delivery.place = NOWHERE

    # -- workers (hostnames as the task table cleans them: the worker table's labels) -------

    def worker_offline(self, hostname: str) -> None:
        self.gone.add(hostname)
        held = self.by_host.get(hostname)
        if held:
            for delivery in [d for d in held if d.place != RUNNING]:
                self.ended(delivery)

    def worker_gone(self, hostname: str, lost: bool) -> None:
        self.gone.add(hostname)
        held = self.by_host.pop(hostname, None)
        for delivery, record in (held or {}).items():
            if lost:
                key = _key(record, delivery)
                self.lost[key] = self.lost.get(key, 0) + 1
            self._leave(delivery)

    def worker_back(self, hostname: str) -> None:
        self.gone.discard(hostname)

    def worker_forgotten(self, hostname: str) -> None:
        self.gone.discard(hostname)  # bounded like the worker table: pods come and go

    def worker_idle(self, hostname: str, at: float) -> None:
        held = self.by_host.get(hostname)
        if held:
            done = [
                d for d in held if d.place == RUNNING and d.started is not None and d.started < at
            ]
            for delivery in done:  # its end never reached us; it is not running now
                self.ended(delivery)

    # -- time -----------------------------------------------------------------------------------

    def tick(self, wall: float) -> None:
        """Scheduled deliveries whose ETA has come start waiting."""
        heap = self._scheduled
        while heap and heap[0][0] <= wall:
            _, _, delivery, record = heapq.heappop(heap)
            if delivery.place == SCHEDULED:
                delivery.place = WAITING
                self.waiting[delivery] = record
                self.scheduled -= 1
        if len(heap) > _HEAP_SLACK * self.scheduled + _HEAP_FLOOR:
            self._scheduled = [entry for entry in heap if entry[2].place == SCHEDULED]
            heapq.heapify(self._scheduled)

    # -- reading --------------------------------------------------------------------------------

    @staticmethod
    def gauges(place: dict[Delivery, TaskRecord]) -> Gauges:
        counts: dict[LabelKey, int] = {}
        oldest: dict[LabelKey, float] = {}
        for delivery, record in place.items():
            key = _key(record, delivery)
            counts[key] = counts.get(key, 0) + 1
            since = oldest.get(key)
            if since is None or delivery.since < since:
                oldest[key] = delivery.since
        return Gauges(counts, oldest)

    def waiting_by_host(self) -> dict[object, int]:
        """Per hostname, deliveries waiting to start there (Celery's reserved requests)."""
        counts: dict[object, int] = {}
        for delivery in self.waiting:
            counts[delivery.host] = counts.get(delivery.host, 0) + 1
        return counts
