"""Ship log lines to a network sink without ever blocking the task that logged them.

`ShippingHandler.emit` only formats and appends to a bounded in-memory queue. A background
thread (started lazily in each process, so prefork pool children get their own) sends batches;
the sink (`sinks.py`, `elastic.py`) decides what counts as delivered. When sending fails, the
batch goes to an on-disk spool and so does everything after it, so order is kept; the spool is
drained oldest first once the sink answers again, retrying with capped backoff meanwhile. On
close the thread gets a bounded time to flush; what it cannot send stays in the spool for the
next start.
Past the queue or spool bounds the oldest lines are dropped, counted, and reported in a record.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections import deque

from .sinks import Sink, SinkError
from .spool import AnySpool, MemorySpool, Spool, SpoolBusy

__all__ = ["ShippingHandler", "Sink", "SinkError"]

# Said on the shipping thread: ShippingHandler drops those records (shipping them could fail
# again, and say so again), Celery's own handlers show them on the worker's stderr.
status = logging.getLogger("celery_obs.log_shipping")


class ShippingHandler(logging.Handler):
    def __init__(
        self,
        sink: Sink,
        spool_dir: str,
        *,
        max_queue: int = 10_000,
        batch_size: int = 500,
        flush_interval: float = 0.5,
        spool_max_bytes: int = 256 * 1024 * 1024,
        backoff_start: float = 0.5,
        backoff_cap: float = 30.0,
        close_timeout: float = 5.0,
    ) -> None:
        super().__init__()
        self.sink = sink
        self.spool_root = spool_dir
        self.max_queue = max_queue
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.spool_max_bytes = spool_max_bytes
        self.backoff_start = backoff_start
        self.backoff_cap = backoff_cap
        self.close_timeout = close_timeout
        self.dropped = 0  # lines dropped from the full in-memory queue
        self.sent = 0
        self.last_error: str | None = None  # while the sink is failing
        self._pid = -1
        self._queue: deque[bytes] = deque()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._spool: AnySpool | None = None
        self._close_deadline = float("inf")
        self._inherited_rejections = 0
        self._reported_drops = self._reported_rejections = 0

    # -- the task's side: format and enqueue, nothing else ----------------------------------

    def emit(self, record: logging.LogRecord) -> None:
        if self._thread is not None and threading.current_thread() is self._thread:
            # Logged while shipping (the Elasticsearch client logs every request, and its
            # failures): shipping that would log again, forever. Other handlers still show it.
            return
        try:
            line = self.format(record).encode()
            if self._pid != os.getpid():
                self._start()  # first record in this process (a forked pool child, say)
            queue = self._queue
            if len(queue) >= self.max_queue:
                queue.popleft()
                self.dropped += 1
            queue.append(line)
            if len(queue) >= self.batch_size:
                self._wake.set()
        except Exception:  # never into the task: logging reports it on stderr
            self.handleError(record)

    def _start(self) -> None:
        """Start this process' shipping thread. Cheap: the spool is opened (and orphans
        adopted, which may move megabytes) on the thread, never on the task's."""
        with self.lock:  # type: ignore[union-attr]
            if self._pid == os.getpid():
                return
            forked = self._pid != -1
            self._pid = os.getpid()
            self._queue = deque()  # a forked child must not resend its parent's lines
            # Fresh events: a lock inside one may have been held by the parent's thread at fork.
            self._wake = threading.Event()
            self._stopping = threading.Event()
            self._close_deadline = float("inf")
            # A forked child inherits the sink's count of refusals, which its parent reported.
            self._inherited_rejections = getattr(self.sink, "rejected", 0) if forked else 0
            if forked:  # the parent's spool, connection and counts are not ours
                self.dropped = self.sent = 0
                self.last_error = None
                if self._spool is not None:
                    self._spool.release()
                    self._spool = None
                self.sink.close()
            self._thread = threading.Thread(target=self._run, name="log-shipper", daemon=True)
            self._thread.start()

    def _open_spool(self) -> Spool:
        """This process' own spool, with the batches of dead processes' spools moved in."""
        os.makedirs(self.spool_root, mode=0o700, exist_ok=True)
        name = f"pid-{self._pid}"
        for attempt in range(100):
            try:
                spool = Spool(os.path.join(self.spool_root, name), self.spool_max_bytes)
                break
            except SpoolBusy:  # the same pid in another container sharing the spool volume
                name = f"pid-{self._pid}-{attempt + 1}"
        else:
            raise SpoolBusy(f"no free spool directory under {self.spool_root}")
        self._adopt_orphans(spool)
        return spool

    def _adopt_orphans(self, spool: Spool) -> None:
        """Take over spools whose owner is gone (a restarted worker's processes): being able to
        lock one means its owner died. Of the pool children that start together, the one
        holding the lock moves the batches into its own spool, in order; the rest skip it."""
        for entry in sorted(os.listdir(self.spool_root)):
            path = os.path.join(self.spool_root, entry)
            if not entry.startswith("pid-") or path == str(spool.directory):
                continue
            try:
                orphan = Spool(path, self.spool_max_bytes)
            except OSError:  # SpoolBusy: its owner runs; or it vanished meanwhile
                continue
            while (batch := orphan.peek()) is not None:
                spool.push(batch)
                orphan.pop()
            orphan.remove()

    # -- the background thread ----------------------------------------------------------------

    def _take(self) -> list[bytes]:
        queue, batch = self._queue, list[bytes]()
        while queue and len(batch) < self.batch_size:
            batch.append(queue.popleft())
        return batch

    def _run(self) -> None:
        self._reported_drops = 0
        self._reported_rejections = self._inherited_rejections
        delay = self.backoff_start
        spool: AnySpool | None = None
        while True:
            stopping = self._stopping.is_set()
            if not stopping:
                self._wake.wait(self.flush_interval)
                self._wake.clear()
            try:
                if spool is None:
                    spool = self._spool = self._open_spool_or_memory()
                self._report_losses(spool)
                delivered = self._drain(spool)
            except Exception as exc:  # the spool's disk (full, unwritable): keep going
                self._failing(exc)
                delivered = False
            if delivered:
                delay = self.backoff_start
                if stopping and not self._queue:
                    return
                continue
            if stopping:
                with contextlib.suppress(Exception):
                    if spool is not None:
                        self._spill(spool)
                return
            self._back_off(spool, delay)
            delay = min(delay * 2, self.backoff_cap)

    def _open_spool_or_memory(self) -> AnySpool:
        try:
            return self._open_spool()
        except OSError as exc:  # keep shipping; hold back-ups in memory instead
            status.warning("log spool %s unusable (%s); spooling in memory", self.spool_root, exc)
            return MemorySpool(self.spool_max_bytes)

    def _report_losses(self, spool: AnySpool) -> None:
        """Queue a record saying how many lines were dropped or refused since the last one."""
        drops = self.dropped + spool.dropped_lines
        if drops != self._reported_drops:
            self._queue.append(
                self._report(
                    "log-records-dropped",
                    drops - self._reported_drops,
                    "log shipping dropped %d records (queue or spool full)",
                )
            )
            self._reported_drops = drops
        rejected = getattr(self.sink, "rejected", 0)
        if rejected != self._reported_rejections:
            self._queue.append(
                self._report(
                    "log-records-rejected",
                    rejected - self._reported_rejections,
                    "the log sink refused %d records for good; latest: %s",
                    getattr(self.sink, "last_rejection", ""),
                )
            )
            self._reported_rejections = rejected

    def _back_off(self, spool: AnySpool | None, delay: float) -> None:
        """Wait before retrying the sink, moving the queue to the spool as it fills, so a long
        outage drops nothing until the spool itself is full."""
        deadline = time.monotonic() + delay
        while not self._stopping.is_set() and (left := deadline - time.monotonic()) > 0:
            self._wake.wait(left)
            self._wake.clear()
            if spool is not None:
                try:
                    self._spill(spool)
                except OSError as exc:
                    self._failing(exc)

    def _past_close_deadline(self) -> bool:
        return self._stopping.is_set() and time.monotonic() > self._close_deadline

    def _drain(self, spool: AnySpool) -> bool:
        """Send spooled batches, then queued ones; False (spooling the batch) on failure.
        Closing and out of time: the rest goes to the spool, for the next start."""
        while (spooled := spool.peek()) is not None:
            if self._past_close_deadline():
                self._spill(spool)
                return True
            unsent = self._send(spooled)
            if unsent is not None:
                if len(unsent) < len(spooled):
                    spool.replace_oldest(unsent)
                self._spill(spool)
                return False
            spool.pop()
        while batch := self._take():
            if self._past_close_deadline():
                self._push(spool, batch)
                self._spill(spool)
                return True
            unsent = self._send(batch)
            if unsent is not None:
                # In order: the unsent lines, then everything after them, go to the spool.
                if unsent:
                    self._push(spool, unsent)
                self._spill(spool)
                return False
        return True

    def _send(self, lines: list[bytes]) -> list[bytes] | None:
        """None when the sink took every line, else the lines still to send."""
        try:
            self.sink.send(lines)
        except Exception as exc:  # SinkError, or a sink's bug: either way keep the lines
            remaining = getattr(exc, "remaining", None)
            unsent = lines if remaining is None else remaining
            self.sent += len(lines) - len(unsent)
            self._failing(exc)
            return unsent
        self.sent += len(lines)
        if self.last_error is not None:
            status.warning("log shipping recovered (last error: %s)", self.last_error)
            self.last_error = None
        return None

    def _failing(self, exc: BaseException) -> None:
        """Say it once per outage (on the worker's other handlers), keep the latest reason."""
        if self.last_error is None:
            status.warning(
                "log shipping failing (%s); keeping records in %s and retrying",
                exc,
                self.spool_root,
            )
        self.last_error = f"{type(exc).__name__}: {exc}"

    def _spill(self, spool: AnySpool) -> None:
        while batch := self._take():
            self._push(spool, batch)

    def _push(self, spool: AnySpool, lines: list[bytes]) -> None:
        try:
            spool.push(lines)
        except OSError:
            self.dropped += len(lines)  # the disk refused them: counted, reported, then retried
            raise

    def _report(self, action: str, count: int, message: str, *args: object) -> bytes:
        """A record about the shipping itself (lost or refused lines), sent with the rest."""
        record = logging.LogRecord(
            "celery_obs.log_shipping", logging.WARNING, __file__, 0, message, (count, *args), None
        )
        record.ecs = {
            "event": {"action": action, "outcome": "failure"},
            "labels": {action.replace("-", "_"): count},
        }
        try:
            return self.format(record).encode()
        except Exception:  # no formatter: still say it
            return json.dumps({"message": record.getMessage()}).encode()

    def flush(self) -> None:
        self._wake.set()

    def close(self) -> None:
        """Flush within about `close_timeout`; the rest stays in the spool for the next start.
        A batch already on the wire gets the sink's own timeout on top."""
        if self._thread is not None and self._pid == os.getpid():
            self._close_deadline = time.monotonic() + self.close_timeout
            self._stopping.set()
            self._wake.set()
            self._thread.join(self.close_timeout + getattr(self.sink, "timeout", 5.0) + 1.0)
            if not self._thread.is_alive() and self._spool is not None:
                with contextlib.suppress(OSError):
                    self._spill(self._spool)  # lines logged after the flush: for next start
                self._spool.release()  # the next process (or handler) takes over what is left
        self.sink.close()
        super().close()
