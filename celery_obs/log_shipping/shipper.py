"""Ship log lines to a network sink without ever blocking, or raising into, the task that
logged them; and say how many were lost when some are.

`ShippingHandler.emit` formats and appends to a bounded in-memory queue (`linequeue.py`); it
never waits for the network, and only when the queue is past its bounds does it move a batch
to the spool itself (waiting `RELIEVE_WAIT` at most) before dropping. Two threads, started
lazily in each process (so prefork pool children get their own), do the rest; the sink
(`sinks.py`, `elastic.py`) decides what counts as delivered. This module is the handler and
its threads; the rest is elsewhere: delivery and loss reports in `pump.py`, the spool policy
(disk, else memory) in `fallback.py`, backoff in `retry.py`.

- The sender runs the delivery pump (`pump.py`): batches, the spool's oldest first, retried
  with capped backoff; losses reported as records of their own.
- The spiller moves the queue to the spool whenever it is past half its bounds (a slow sink),
  its oldest line has waited `spill_after` seconds, or the sink is failing: lines are dropped
  only when the spool cannot take them, and a SIGKILL loses only what came in the last
  `spill_after` seconds (plus the batch in flight).

The spool is the disk while the disk takes writes, memory (bounded) while it refuses them or
when it cannot be used at all (`fallback.FallbackSpool`). On close the sender gets a bounded
time to flush; what it cannot send stays in the spool for the next start, and what only
memory held is said in the worker's log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from threading import get_ident

from ..retry import Backoff
from .fallback import FallbackSpool, open_spool
from .linequeue import FULL, SPILL, LineQueue
from .losses import DROPPED, REJECTED, LossReports
from .pump import DeliveryPump, status
from .sinks import Sink, SinkError

__all__ = ["ShippingHandler", "Sink", "SinkError"]

MB = 1024 * 1024
#: The longest a log call waits for the spool when the queue is full (then it drops).
RELIEVE_WAIT = 0.1


class ShippingHandler(logging.Handler):
    def __init__(
        self,
        sink: Sink,
        spool_dir: str | None,
        *,
        max_queue: int = 10_000,
        max_queue_bytes: int = 16 * MB,
        batch_size: int = 500,
        max_batch_bytes: int = 1 * MB,
        flush_interval: float = 0.5,
        spool_max_bytes: int = 256 * MB,
        memory_spool_max_bytes: int = 32 * MB,
        spill_after: float = 1.0,
        report_interval: float = 1.0,
        backoff_start: float = 0.5,
        backoff_cap: float = 30.0,
        close_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`spool_dir` None: no disk at all, the spool is memory only."""
        if not min(backoff_start, backoff_cap) > 0:
            raise ValueError("backoff_start and backoff_cap must be positive")
        super().__init__()
        self.sink = sink
        self.spool_root = spool_dir
        self.max_queue = max_queue
        self.max_queue_bytes = max_queue_bytes
        self.batch_size = batch_size
        self.max_batch_bytes = max_batch_bytes
        self.flush_interval = flush_interval
        self.spool_max_bytes = spool_max_bytes
        self.memory_spool_max_bytes = memory_spool_max_bytes
        self.spill_after = spill_after
        self.report_interval = report_interval
        self.backoff_start = backoff_start
        self.backoff_cap = backoff_cap
        self.close_timeout = close_timeout
        self.clock = clock
        self._pid = -1
        self._here = False  # threads started in this process (os.getpid() is a system call)
        _handlers.add(self)
        self._reset()

    def _reset(self) -> None:
        """This process' own state (a forked child must not share its parent's)."""
        self._queue = LineQueue(self.max_queue, self.max_queue_bytes, self.batch_size, self.clock())
        self._dropped_elsewhere = 0  # lines lost outside the queue and the spool
        self._wake = threading.Event()  # the sender: a batch is ready, or closing
        self._spill_now = threading.Event()  # the spiller: the queue is past half a bound
        self._spool_open = threading.Event()
        self._stopping = threading.Event()
        self._order = threading.Lock()  # taking from the queue and using the spool
        self._thread: threading.Thread | None = None
        self._spiller: threading.Thread | None = None
        self._own_threads: tuple[int | None, ...] = ()
        self._spool: FallbackSpool | None = None
        self._reports = LossReports(status.name, self.format, self.report_interval, self.clock)
        self._relieve_after = float("-inf")
        self._fallback_said = False
        self._fallback: str | None = None  # why the spool is in memory, until said
        self._pump = DeliveryPump(
            self._queue,
            self.sink,
            self._open_spool,
            order=self._order,
            reports=self._reports,
            dropped=lambda: self.dropped,
            backoff=Backoff(min(self.backoff_start, self.backoff_cap), self.backoff_cap),
            clock=self.clock,
            wait=self._wait_for_lines,
            sleep=self._stopping.wait,
            batch_size=self.batch_size,
            max_batch_bytes=self.max_batch_bytes,
            where=self.spool_root or "memory",
            each_round=self._say_pending,
        )

    @property
    def sent(self) -> int:
        """Lines the sink took, in this process."""
        return self._pump.sent

    @property
    def last_error(self) -> str | None:
        """Why the sink is failing, while it is."""
        return self._pump.last_error

    @last_error.setter
    def last_error(self, value: str | None) -> None:
        self._pump.last_error = value

    @property
    def dropped(self) -> int:
        """Lines dropped so far: the queue's bound, the spool's, lost at a refused write."""
        spool = self._spool.dropped_lines if self._spool is not None else 0
        return self._queue.dropped + spool + self._dropped_elsewhere

    @dropped.setter
    def dropped(self, value: int) -> None:
        self._dropped_elsewhere += value - self.dropped

    @property
    def spooled(self) -> int:
        """Batches waiting in the spool (disk or memory) for the sink to come back."""
        spool = self._spool
        return len(spool) if spool is not None else 0

    @property
    def queued(self) -> int:
        """Lines only in memory, waiting for the sender or the spiller."""
        return len(self._queue)

    # -- the task's side: format and enqueue, nothing else ----------------------------------

    def handle(self, record: logging.LogRecord) -> bool:
        """Logging.Handler.handle, but records logged by our own threads are dropped before
        the handler's lock: logging.shutdown() holds it while close() waits for them."""
        if get_ident() in self._own_threads:
            # Logged while shipping (the Elasticsearch client logs every request, and its
            # failures): shipping that would log again, forever. Other handlers still show it.
            return False
        passed = self.filter(record)  # Handler.handle, inlined: this is every log call
        if passed:
            if isinstance(passed, logging.LogRecord):  # 3.12: a filter may return a new record
                record = passed
            with self.lock:  # type: ignore[union-attr]
                self.emit(record)
        return bool(passed)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record).encode()
            if not self._here:
                self._start()  # first record in this process (a forked pool child, say)
            signal = self._queue.put(line)
            if signal:
                self._signal(signal)
        except Exception:  # never into the task: logging reports it on stderr
            self.handleError(record)

    def _signal(self, signal: int) -> None:
        if signal == FULL:
            self._relieve()
        if not self._wake.is_set():
            self._wake.set()
        if signal >= SPILL and not self._spill_now.is_set():
            self._spill_now.set()

    def _relieve(self) -> None:
        """The queue is past a bound: the spiller is behind (the logging thread keeps the GIL
        for milliseconds at a time). Spill here, as a disk write's worth of backpressure,
        rather than drop; but never wait for the spool longer than `RELIEVE_WAIT`, and after
        such a wait, not again for a second: a stalled disk costs records (counted), not the
        task its time. Then drop (counted) what is still past the bound."""
        queue = self._queue
        if self.clock() >= self._relieve_after:
            started = self.clock()
            self._spool_open.wait(RELIEVE_WAIT)  # the sender opens it as it starts
            spool = self._spool
            left = RELIEVE_WAIT - (self.clock() - started)
            if spool is not None and self._order.acquire(timeout=max(left, 0.0)):
                try:
                    while queue.over_high_water():
                        batch = queue.take(self.batch_size, self.max_batch_bytes)
                        if not batch:
                            break
                        spool.push(batch)
                finally:
                    self._order.release()
            else:
                self._relieve_after = self.clock() + 1.0
        queue.trim()

    def _start(self) -> None:
        """Start this process' shipping threads. Cheap: the spool is opened (and orphans
        adopted, which may move many files) on the sender, never on the task's thread."""
        with self.lock:  # type: ignore[union-attr]
            if self._pid == os.getpid():
                self._here = True
                return
            forked = self._pid != -1
            if forked and self._spool is not None:
                self._spool.release()  # the parent's lock stays the parent's
            self._pid = os.getpid()
            if forked:  # the parent's queue, spool, connection and counts are not ours
                self._reset()  # fresh events too: a lock inside one may have been held at fork
                self.sink.close()
                # The sink's count of refusals is the parent's, and the parent reports it.
                self._reports.told(REJECTED, getattr(self.sink, "rejected", 0))
            self._thread = threading.Thread(target=self._run, name="log-shipper", daemon=True)
            self._spiller = threading.Thread(
                target=self._spill_loop, name="log-spiller", daemon=True
            )
            self._thread.start()
            self._spiller.start()
            self._own_threads = (self._thread.ident, self._spiller.ident)
            self._here = True

    # -- the spool ------------------------------------------------------------------------------

    def _open_spool(self) -> FallbackSpool:
        """On the sender thread, as it starts (opening may adopt many files)."""
        spool, problem = open_spool(
            self.spool_root,
            self._pid,
            self.spool_max_bytes,
            self.memory_spool_max_bytes,
            self._disk_refused,
        )
        if problem is not None:
            self._say_fallback(problem)
        self._spool = spool
        self._spool_open.set()
        return spool

    def _disk_refused(self, exc: OSError) -> None:
        # Called with the order lock held, maybe on the task's thread: said later, by the
        # sender (logging here could come back to this handler and wait for that lock).
        if self._fallback is None:
            self._fallback = f"log spool {self.spool_root} refused a write ({exc})"

    def _say_fallback(self, what: str) -> None:
        if not self._fallback_said:
            self._fallback_said = True
            status.warning(
                "%s; keeping undelivered log records in memory (up to %d MB, lost if the "
                "process dies)",
                what,
                self.memory_spool_max_bytes // MB,
            )

    def _say_pending(self) -> None:
        if self._fallback is not None:
            self._say_fallback(self._fallback)

    # -- the spiller thread -----------------------------------------------------------------

    def _spill_loop(self) -> None:
        tick = min(0.25, self.spill_after / 4)
        queue = self._queue
        while not self._stopping.is_set():
            self._spill_now.wait(tick)
            self._spill_now.clear()
            now = self.clock()
            queue.mark(now)
            spool = self._spool
            if spool is None or not len(queue):
                continue
            if (
                self.last_error is not None
                or queue.over_high_water()
                or queue.oldest_age(now) > self.spill_after
            ):
                try:
                    self._pump.spill(spool)
                except Exception as exc:  # the spiller must outlive anything
                    self._pump.failing(exc)

    # -- the sender thread --------------------------------------------------------------------

    def _wait_for_lines(self, seconds: float) -> None:
        self._wake.wait(seconds)
        self._wake.clear()

    def _run(self) -> None:
        self._pump.run(self.flush_interval, self._stopping.is_set)

    # -- closing ------------------------------------------------------------------------------

    def flush(self) -> None:
        self._wake.set()

    def close(self) -> None:
        """Flush within about `close_timeout`; the rest stays in the spool for the next start.
        A batch already on the wire gets the sink's own timeout on top."""
        if self._thread is not None and self._pid == os.getpid():
            self._pump.close_deadline = self.clock() + self.close_timeout
            self._stopping.set()
            self._wake.set()
            self._spill_now.set()
            self._thread.join(self.close_timeout + getattr(self.sink, "timeout", 5.0) + 1.0)
            if self._spiller is not None:
                self._spiller.join(self.close_timeout)
            if not self._thread.is_alive() and self._spool is not None:
                self._last_words(self._spool)
                self._spool.release()  # the next process (or handler) takes over what is left
        self.sink.close()
        super().close()

    def _last_words(self, spool: FallbackSpool) -> None:
        """Leave what is still here where the next start finds it: lines logged after the
        flush, what memory held, and unreported losses (as report lines in the disk spool);
        and say on stderr what cannot be left anywhere."""
        with contextlib.suppress(Exception):
            self._pump.spill(spool)
        with contextlib.suppress(Exception):
            spool.flush_to_disk()
        totals = self._pump.totals()
        unreported = {a: self._reports.unreported(a, t) for a, t in totals.items()}
        detail = getattr(self.sink, "last_rejection", "")
        lines = [self._reports.line(a, n, detail) for a, n in unreported.items() if n]
        if lines and spool.disk is not None and spool.on_disk:
            try:
                spool.disk.push(lines)
            except OSError:
                pass
            else:
                for action, total in totals.items():
                    self._reports.told(action, total)
                unreported = dict.fromkeys(unreported, 0)
        lost = spool.memory_lines()
        if lost or any(unreported.values()):
            status.warning(
                "log shipping is closing with %d records it could not send nor spool to disk "
                "(lost), and %d dropped and %d refused records it could not report",
                lost,
                unreported[DROPPED],
                unreported[REJECTED],
            )


#: Every handler, so that a forked child knows its threads are not started yet.
_handlers: weakref.WeakSet[ShippingHandler] = weakref.WeakSet()


def _forked() -> None:
    for handler in list(_handlers):
        handler._here = False


os.register_at_fork(after_in_child=_forked)
