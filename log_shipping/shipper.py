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
from collections import deque

from .sinks import Sink, SinkError
from .spool import Spool

__all__ = ["ShippingHandler", "Sink", "SinkError"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, not ours
        return True
    return True


def _owner(entry: str) -> int | None:
    """The pid owning a spool directory: `pid-N`, or `claimed-N-...` while N adopts it."""
    for prefix in ("pid-", "claimed-"):
        if entry.startswith(prefix):
            number = entry[len(prefix) :].split("-", 1)[0]
            return int(number) if number.isdigit() else None
    return None


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
        self.backoff_cap = backoff_cap
        self.close_timeout = close_timeout
        self.dropped = 0  # lines dropped from the full in-memory queue
        self.sent = 0
        self._pid = -1
        self._queue: deque[bytes] = deque()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._spool: Spool | None = None

    # -- the task's side: format and enqueue, nothing else ----------------------------------

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record).encode()
        except Exception:
            self.handleError(record)
            return
        if self._pid != os.getpid():
            self._start()  # first record in this process (a forked pool child, say)
        queue = self._queue
        if len(queue) >= self.max_queue:
            queue.popleft()
            self.dropped += 1
        queue.append(line)
        if len(queue) >= self.batch_size:
            self._wake.set()

    def _start(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self._queue = deque()  # a forked child must not resend its parent's lines
            # Fresh events: a lock inside one may have been held by the parent's thread at fork.
            self._wake = threading.Event()
            self._stopping = threading.Event()
            self._spool = Spool(
                os.path.join(self.spool_root, f"pid-{self._pid}"), self.spool_max_bytes
            )
            self._adopt_orphans(self._spool)
            self._thread = threading.Thread(target=self._run, name="log-shipper", daemon=True)
            self._thread.start()

    def _adopt_orphans(self, spool: Spool) -> None:
        """Take over spools left by processes that are gone (a restarted worker's children).

        The pool children of a restarted worker start together: each claims an orphan by
        renaming its directory first, so exactly one of them resends it.
        """
        for entry in sorted(os.listdir(self.spool_root)):
            owner = _owner(entry)
            if owner is None or owner == self._pid or _alive(owner):
                continue
            claimed = os.path.join(self.spool_root, f"claimed-{self._pid}-{entry}")
            try:
                os.rename(os.path.join(self.spool_root, entry), claimed)
            except OSError:
                continue  # another process claimed it first
            orphan = Spool(claimed, self.spool_max_bytes)
            while (batch := orphan.peek()) is not None:
                spool.push(batch)
                orphan.pop()
            with contextlib.suppress(OSError):
                os.rmdir(claimed)

    # -- the background thread ----------------------------------------------------------------

    def _take(self) -> list[bytes]:
        queue, batch = self._queue, list[bytes]()
        while queue and len(batch) < self.batch_size:
            batch.append(queue.popleft())
        return batch

    def _run(self) -> None:
        spool = self._spool
        assert spool is not None
        delay, reported_drops, reported_rejections = 0.5, 0, 0
        while True:
            stopping = self._stopping.is_set()
            if not stopping:
                self._wake.wait(self.flush_interval)
                self._wake.clear()
            drops = self.dropped + spool.dropped_lines
            if drops != reported_drops:
                self._queue.append(
                    self._report(
                        "log-records-dropped",
                        drops - reported_drops,
                        "log shipping dropped %d records (queue or spool full)",
                    )
                )
                reported_drops = drops
            rejected = getattr(self.sink, "rejected", 0)
            if rejected != reported_rejections:
                self._queue.append(
                    self._report(
                        "log-records-rejected",
                        rejected - reported_rejections,
                        "the log sink refused %d records for good; latest: %s",
                        getattr(self.sink, "last_rejection", ""),
                    )
                )
                reported_rejections = rejected
            if self._drain(spool):
                delay = 0.5
            else:
                if stopping:
                    self._spill(spool)
                    return
                self._stopping.wait(delay)
                delay = min(delay * 2, self.backoff_cap)
                continue
            if stopping and not self._queue:
                return

    def _drain(self, spool: Spool) -> bool:
        """Send spooled batches, then queued ones; False (spooling the batch) on failure."""
        while (spooled := spool.peek()) is not None:
            try:
                self.sink.send(spooled)
            except SinkError as exc:
                if exc.remaining is not None:
                    self.sent += len(spooled) - len(exc.remaining)
                    spool.replace_oldest(exc.remaining)
                self._spill(spool)
                return False
            spool.pop()
            self.sent += len(spooled)
        while batch := self._take():
            try:
                self.sink.send(batch)
            except SinkError as exc:
                # In order: the unsent lines, then everything after them, go to the spool.
                unsent = batch if exc.remaining is None else exc.remaining
                self.sent += len(batch) - len(unsent)
                if unsent:
                    spool.push(unsent)
                self._spill(spool)
                return False
            self.sent += len(batch)
        return True

    def _spill(self, spool: Spool) -> None:
        while batch := self._take():
            spool.push(batch)

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
        """Flush within `close_timeout`; the rest stays in the spool for the next start."""
        if self._thread is not None and self._pid == os.getpid():
            self._stopping.set()
            self._wake.set()
            self._thread.join(self.close_timeout)
            if not self._thread.is_alive() and self._spool is not None:
                self._spill(self._spool)  # lines logged after the flush: kept for next start
        self.sink.close()
        super().close()
