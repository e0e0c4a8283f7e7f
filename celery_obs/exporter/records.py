"""What the task table remembers of one task id: its sends, its deliveries, its events.

A *send* is one task-sent (attempt number, time, ETA, queue). A *delivery* is one task-received:
the task handed to a worker, which then starts it and ends it (retried, succeeded, failed,
revoked, rejected, cancelled) or never says (killed, replaced). Events without an attempt number
are placed on a delivery of their own worker, by what the event means:

- task-started: the first delivery on that worker that has not started;
- task-retried: the open running delivery with the *lowest* attempt (a retried attempt is never
  the last one, and its successor may already be running on the same worker);
- task-succeeded / task-failed: the open running delivery with the *highest* attempt (the
  outcome belongs to the last attempt);
- task-revoked / -rejected / -cancelled: the first open delivery, running or not.

A delivery that can no longer end (its attempt was delivered again, or the task was sent again
by Task.replace) is closed as `abandoned`: it must not take a later delivery's events.
Both lists and the fingerprints of counted events are bounded per task id, so one task redelivered
forever costs a bounded amount of memory and time.
"""

from __future__ import annotations

from array import array
from typing import Any

Event = dict[str, Any]

#: Deliveries kept per task id (a task requeued over and over); the oldest closed ones go first.
MAX_DELIVERIES = 8
#: Fingerprints kept per task id: redeliveries of older events of a very long story recount.
MAX_FINGERPRINTS = 64

ABANDONED = "abandoned"


class Send:
    __slots__ = ("eta", "queue", "retries", "sent")

    def __init__(self, retries: int, sent: float | None, eta: float | None, queue: str | None):
        self.retries = retries
        self.sent = sent
        self.eta = eta
        self.queue = queue


class Delivery:
    """One task-received: the task handed to a worker, and what that worker did with it."""

    __slots__ = (
        "end",
        "eta",
        "host",
        "place",
        "received",
        "retries",
        "since",
        "started",
        "wait_pending",
    )

    def __init__(self, host: object, received: float | None, retries: int, eta: float | None):
        self.host = host
        self.received = received
        self.retries = retries
        self.eta = eta
        self.started: float | None = None
        #: The event type that ended it ("" while open, ABANDONED if it never will).
        self.end = ""
        #: Started, but its attempt's task-sent (the start of the wait) has not arrived yet.
        self.wait_pending = False
        #: Where `occupancy` counts it (scheduled, waiting, running or nowhere), and since when.
        self.place = 0
        self.since = 0.0

    @property
    def open(self) -> bool:
        return not self.end


class TaskRecord:
    __slots__ = (
        "deliveries",
        "final",
        "fingerprints",
        "latency_done",
        "name",
        "origin",
        "pending",
        "queue",
        "ran",
        "sends",
        "uuid",
    )

    def __init__(self, uuid: str = "") -> None:
        #: The task id (the table's key, the same string): exemplars name it.
        self.uuid = uuid
        self.name: str | None = None
        #: The queue of the latest send (a retry may go to another queue).
        self.queue: str | None = None
        self.sends: list[Send] = []
        #: The first send of the first attempt: where end-to-end latency starts.
        self.origin: Send | None = None
        self.deliveries: list[Delivery] = []
        #: hash((type, timestamp, hostname, retries)) of the events counted for this task id.
        self.fingerprints = array("q")
        self.final = False
        #: A task-started was seen (a failure without one, and no delivery, never ran).
        self.ran = False
        self.latency_done = False
        #: Events held back until this task's task-sent (which carries the queue) arrives.
        self.pending: list[Event] | None = None

    # -- what was counted ---------------------------------------------------------------------

    def seen(self, fingerprint: int) -> bool:
        return fingerprint in self.fingerprints

    # -- sends --------------------------------------------------------------------------------

    def send_of(self, retries: int) -> Send | None:
        for send in self.sends:
            if send.retries == retries:
                return send
        return None

    def queue_of(self, retries: int) -> str | None:
        for send in self.sends:
            if send.retries == retries:
                return send.queue if send.queue is not None else self.queue
        return self.queue

    # -- placing events without an attempt number ------------------------------------------------

    def next_to_start(self, host: object) -> Delivery | None:
        for delivery in self.deliveries:
            if delivery.host == host and delivery.started is None and delivery.open:
                return delivery
        return None

    def running(self, host: object, last: bool) -> Delivery | None:
        """The open started delivery on `host` with the highest (`last`) or lowest attempt."""
        best: Delivery | None = None
        for delivery in self.deliveries:
            if delivery.host != host or not delivery.open or delivery.started is None:
                continue
            if best is None or (
                delivery.retries >= best.retries if last else delivery.retries < best.retries
            ):
                best = delivery
        return best

    def first_open(self, host: object) -> Delivery | None:
        """The first open delivery on `host`: running, else waiting (revoked before it ran)."""
        waiting = None
        for delivery in self.deliveries:
            if delivery.host == host and delivery.open:
                if delivery.started is not None:
                    return delivery
                waiting = waiting or delivery
        return waiting

    def last_ended_on(self, host: object) -> Delivery | None:
        for delivery in reversed(self.deliveries):
            if delivery.host == host and not delivery.open:
                return delivery
        return None

    # -- keeping the lists short ------------------------------------------------------------------

    def add_delivery(self, delivery: Delivery) -> list[Delivery]:
        """Append; returns deliveries dropped to keep the bound (open ones are abandoned)."""
        self.deliveries.append(delivery)
        dropped: list[Delivery] = []
        while len(self.deliveries) > MAX_DELIVERIES:
            closed = next((d for d in self.deliveries if not d.open), None)
            victim = closed if closed is not None else self.deliveries[0]
            self.deliveries.remove(victim)
            dropped.append(victim)
        return dropped
