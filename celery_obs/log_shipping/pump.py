"""The delivery pump: moves queued and spooled lines to the sink, oldest first, and says what
was lost. It runs on the shipping handler's sender thread, but knows nothing of threads or
logging: its queue, sink, spool, clock and wait are arguments, so its tests run on an
injected clock instead of real backoffs.

- It sends batches (at most `batch_size` lines and `max_batch_bytes`), the spool's oldest
  first. When a send fails, the batch goes back in front of the spool, the queue is spilled
  behind it (order is kept), and the sink is retried with capped backoff.
- Lines dropped past the bounds, and lines the sink refuses for good, are counts, not lines: a
  report record is sent on its own, and the count is cleared only once the sink took it, so a
  report is never lost with the lines it is about.
- Closing, it gets until a deadline; what it cannot send by then goes to the spool.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable

from ..retry import Backoff
from .fallback import FallbackSpool
from .linequeue import LineQueue
from .losses import DROPPED, REJECTED, LossReports
from .sinks import Sink

# Said on the shipping threads: ShippingHandler drops those records (shipping them could fail
# again, and say so again), Celery's own handlers show them in the worker's log.
status = logging.getLogger("celery_obs.log_shipping")


class DeliveryPump:
    def __init__(
        self,
        queue: LineQueue,
        sink: Sink,
        open_spool: Callable[[], FallbackSpool],
        *,
        order: threading.Lock,
        reports: LossReports,
        dropped: Callable[[], int],
        backoff: Backoff,
        clock: Callable[[], float],
        wait: Callable[[float], object],
        sleep: Callable[[float], object],
        batch_size: int = 500,
        max_batch_bytes: int = 1024 * 1024,
        where: str = "memory",
        each_round: Callable[[], None] = lambda: None,
    ) -> None:
        """`open_spool` is called on the pump's thread (opening may adopt many files);
        `order` is held while lines move between the queue and the spool (the spiller and a
        relieved log call move them too); `dropped` counts lines lost so far.
        `wait(seconds)` waits for lines (it returns early when a batch is ready, or closing);
        `sleep(seconds)` backs off from a failing sink (it returns early when closing).
        `each_round` runs first in every round (the handler says what it kept to say)."""
        self.queue = queue
        self.sink = sink
        self.open_spool = open_spool
        self.order = order
        self.reports = reports
        self.dropped = dropped
        self.backoff = backoff
        self.clock = clock
        self.wait = wait
        self.sleep = sleep
        self.each_round = each_round
        self.batch_size = batch_size
        self.max_batch_bytes = max_batch_bytes
        self.where = where
        self.spool: FallbackSpool | None = None
        self.sent = 0
        self.last_error: str | None = None  # while the sink is failing
        self.close_deadline: float | None = None  # set when closing

    # -- the loop -----------------------------------------------------------------------------

    def run(self, flush_interval: float, stopping: Callable[[], bool]) -> None:
        """Deliver until `stopping()` and everything is sent, or the close deadline passes."""
        with contextlib.suppress(Exception):  # else retried below, with the failure said
            self.spool = self.open_spool()
        while True:
            closing = stopping()
            if not closing:
                self.wait(flush_interval)
            delivered = self.step(closing)
            if delivered:
                self.backoff.reset()
                if closing and not len(self.queue):
                    return
                continue
            if closing:
                with contextlib.suppress(Exception):
                    if self.spool is not None:
                        self.spill(self.spool)
                return
            self.sleep(self.backoff.next())

    def step(self, closing: bool = False) -> bool:
        """One round: open the spool if not yet, report losses, send what is there. False
        when the sink (or the disk) failed: the caller backs off."""
        try:
            if self.spool is None:
                self.spool = self.open_spool()
            self.each_round()
            self.report_losses(now=closing)
            return self.drain(self.spool)
        except Exception as exc:  # a sink's or a disk's failure: keep going
            self.failing(exc)
            return False

    # -- moving lines -------------------------------------------------------------------------

    def spill(self, spool: FallbackSpool) -> None:
        """Move the queue, oldest first, behind what the spool holds."""
        while True:
            with self.order:
                batch = self.queue.take(self.batch_size, self.max_batch_bytes)
                if not batch:
                    return
                spool.push(batch)

    def past_close_deadline(self) -> bool:
        return self.close_deadline is not None and self.clock() > self.close_deadline

    def drain(self, spool: FallbackSpool) -> bool:
        """Send spooled batches, then queued ones; False (the batch back in front of the
        spool, the queue behind it) on failure. Closing and out of time: the rest goes to the
        spool, for the next start."""
        while True:
            if self.past_close_deadline():
                self.spill(spool)
                return True
            with self.order:  # the spiller cannot slip lines between the spool and the queue
                batch = spool.peek()
                spooled = batch is not None
                if batch is None:
                    batch = self.queue.take(self.batch_size, self.max_batch_bytes)
            if not batch:
                return True
            unsent = self.send(batch)
            with self.order:
                if spooled and unsent is None:
                    spool.pop()
                elif spooled and unsent is not None and len(unsent) < len(batch):
                    spool.replace_oldest(unsent)
                elif not spooled and unsent:
                    spool.push_front(unsent)
            if unsent is not None:
                self.spill(spool)
                return False

    def send(self, lines: list[bytes]) -> list[bytes] | None:
        """None when the sink took every line, else the lines still to send."""
        try:
            self.sink.send(lines)
        except Exception as exc:  # SinkError, or a sink's bug: either way keep the lines
            remaining = getattr(exc, "remaining", None)
            unsent = lines if remaining is None else remaining
            self.sent += len(lines) - len(unsent)
            self.failing(exc)
            return unsent
        self.sent += len(lines)
        if self.last_error is not None:
            status.warning("log shipping recovered (last error: %s)", self.last_error)
            self.last_error = None
        return None

    def failing(self, exc: BaseException) -> None:
        """Say it once per outage (on the worker's other handlers), keep the latest reason."""
        if self.last_error is None:
            status.warning(
                "log shipping failing (%s); keeping records in %s and retrying", exc, self.where
            )
        self.last_error = f"{type(exc).__name__}: {exc}"

    # -- loss reports -------------------------------------------------------------------------

    def totals(self) -> dict[str, int]:
        return {DROPPED: self.dropped(), REJECTED: getattr(self.sink, "rejected", 0)}

    def report_losses(self, now: bool) -> None:
        """Send a record for each kind of loss the destination has not been told about."""
        if not self.reports.due(now):
            return
        for action, total in self.totals().items():
            count = self.reports.unreported(action, total)
            detail = getattr(self.sink, "last_rejection", "")
            if count and self.deliver(self.reports.line(action, count, detail)):
                self.reports.told(action, total)

    def deliver(self, report: bytes) -> bool:
        """Send a report on its own: True once the sink took it (or refused it for good: our
        own record is not one of the user's to count, and it would be refused again)."""
        before = getattr(self.sink, "rejected", 0)
        unsent = self.send([report])
        refused = getattr(self.sink, "rejected", 0) - before
        self.reports.told(REJECTED, self.reports.reported[REJECTED] + refused)
        return unsent is None
