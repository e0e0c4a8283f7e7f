"""Measure queue wait, runtime and latency from a task's sends and deliveries, only where the two
ends certainly belong together; what cannot be measured is counted by reason, never guessed.

- queue wait, per delivery: its attempt's task-sent (else its task-received) to its start, minus
  the wait its ETA asked for;
- runtime, per delivery that succeeded or failed: Celery's `runtime`, else start to failure;
- latency, once per task id: the first send to the success or failure, minus the first ETA.

A `task-sent` is stamped after the publish, so a quick worker can start a task a few ms "before"
it was sent: negatives within `skew_tolerance` are 0, larger ones are counted as clock skew.
"""

from __future__ import annotations

from collections.abc import Callable

from .aggregates import LabelKey, TaskMetrics
from .metrics import UNKNOWN_LABEL
from .records import ABANDONED, Delivery, TaskRecord
from .selfstats import ExporterStats

#: Longer durations are not believed (a timestamp of 1e308, a runtime past float range): they
#: would poison a histogram's sum for good. Ten years.
MAX_DURATION = 10 * 365 * 86_400.0


class Durations:
    def __init__(
        self,
        metrics: TaskMetrics,
        stats: ExporterStats,
        skew_tolerance: float,
        on_end: Callable[[Delivery], None] = lambda delivery: None,
    ) -> None:
        self.metrics = metrics
        self.stats = stats
        self.skew_tolerance = skew_tolerance
        #: Told whenever a delivery ends (however it ends): it stops running or waiting.
        self.on_end = on_end
        #: The exporter's wall time of the event being handled (set by the task table).
        self.wall = 0.0

    def observe(
        self, metric: str, key: LabelKey, value: float, record: TaskRecord, at: float | None
    ) -> None:
        """One duration of `record`'s task, ended at `at` (its event's time): observed, with the
        task id as the bucket's exemplar."""
        if not value < MAX_DURATION:  # also NaN and +inf
            self.stats.count_unmeasured(metric, "implausible")
            return
        if value < 0:
            if value < -self.skew_tolerance:
                self.stats.count_negative(metric)
            value = 0.0
        # A worker's clock ahead of ours must not stamp exemplars in the future (nor a broken
        # one before the epoch).
        wall = self.wall
        at = wall if at is None or not 0 < at <= wall else at
        if not self.metrics.observe(metric, key, value, record.uuid, at):
            self.stats.count_unmeasured(metric, "implausible")  # -inf

    @staticmethod
    def key(record: TaskRecord, retries: int | None = None) -> LabelKey:
        queue = record.queue if retries is None else record.queue_of(retries)
        return (record.name or UNKNOWN_LABEL, queue or UNKNOWN_LABEL)

    # -- queue wait ---------------------------------------------------------------------------

    def started(
        self, record: TaskRecord, delivery: Delivery, ts: float | None, sends_expected: bool
    ) -> None:
        delivery.started = ts
        if record.send_of(delivery.retries) is None and sends_expected:
            delivery.wait_pending = True  # its task-sent may be on the way (or close() decides)
        else:
            self.wait(record, delivery)

    def sent(self, record: TaskRecord, retries: int) -> None:
        """An attempt's send arrived: deliveries that started before it can be measured now."""
        for delivery in record.deliveries:
            if delivery.retries == retries and delivery.wait_pending:
                self.wait(record, delivery)

    def wait(self, record: TaskRecord, delivery: Delivery) -> None:
        delivery.wait_pending = False
        send = record.send_of(delivery.retries)
        due = delivery.received if send is None or send.sent is None else send.sent
        eta = delivery.eta if send is None or send.eta is None else send.eta
        if due is None or delivery.started is None:
            self.stats.count_unmeasured("queue_wait", "no_timestamp")
            return
        if eta is not None and eta > due:  # an ETA/countdown is a wait the caller asked for
            due = eta
        key, started = self.key(record, delivery.retries), delivery.started
        self.observe("queue_wait", key, started - due, record, started)

    # -- ends -----------------------------------------------------------------------------------

    def close(self, record: TaskRecord, delivery: Delivery, end: str) -> None:
        delivery.end = end
        if delivery.place:  # still shown running or waiting
            self.on_end(delivery)
        if delivery.wait_pending:  # no task-sent came while it ran: wait from its receipt
            self.wait(record, delivery)

    def abandon(self, record: TaskRecord, delivery: Delivery) -> None:
        if delivery.open:
            self.close(record, delivery, ABANDONED)

    def outcome(
        self,
        record: TaskRecord,
        delivery: Delivery | None,
        kind: str,
        runtime: float | None,
        ts: float | None,
    ) -> None:
        """A success or failure: its runtime (unless given by Celery, from its start) and the
        task's latency."""
        retries = delivery.retries if delivery is not None else None
        if runtime is None:
            runtime = self._runtime_of(delivery, ts)
        if runtime is not None:
            outcome = "succeeded" if kind == "task-succeeded" else "failed"
            self.observe("runtime", (*self.key(record, retries), outcome), runtime, record, ts)
        self.latency(record, ts, retries)

    def no_runtime(self, reason: str) -> None:
        self.stats.count_unmeasured("runtime", reason)

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

    def latency(self, record: TaskRecord, ts: float | None, retries: int | None) -> None:
        """End to end, once per task id: first send to the outcome, minus the first ETA.

        Retries (and their countdowns) are inside it: the caller waits through them.
        """
        if record.latency_done:
            return
        record.latency_done = True
        origin = record.origin
        if origin is not None and origin.sent is not None:
            start, eta = origin.sent, origin.eta
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
        self.observe("latency", self.key(record, retries), ts - start, record, ts)
