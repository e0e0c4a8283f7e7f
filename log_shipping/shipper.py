"""Ship log lines to Logstash over HTTP without ever blocking the task that logged them.

`ShippingHandler.emit` only formats and appends to a bounded in-memory queue. A background
thread (started lazily in each process, so prefork pool children get their own) sends batches;
a 2xx from Logstash's `http` input is the acknowledgement. When sending fails, the batch goes to
an on-disk spool and so does everything after it, so order is kept; the spool is drained oldest
first once the sink answers again, retrying with capped backoff meanwhile. On close the thread
gets a bounded time to flush; what it cannot send stays in the spool for the next start.
Past the queue or spool bounds the oldest lines are dropped, counted, and reported in a record.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import logging
import os
import ssl
import threading
import urllib.parse
from collections import deque
from typing import Protocol

from .spool import Spool


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, not ours
        return True
    return True


class SinkError(OSError):
    """The sink did not take the batch; it will be retried from the spool."""


class Sink(Protocol):
    def send(self, lines: list[bytes]) -> None: ...

    def close(self) -> None: ...


class HttpSink:
    """POST a JSON array of records to Logstash's http input (one event per element)."""

    def __init__(
        self,
        url: str,
        timeout: float = 5.0,
        username: str | None = None,
        password: str | None = None,
        api_key: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"log shipping URL must be http(s)://host[:port][/path], got {url!r}")
        self.https = parsed.scheme == "https"
        self.host, self.port = parsed.hostname, parsed.port
        self.path = parsed.path or "/"
        self.timeout = timeout
        self.ssl_context = ssl_context
        self.headers = {"Content-Type": "application/json"}
        user = username or (urllib.parse.unquote(parsed.username) if parsed.username else None)
        secret = password or (urllib.parse.unquote(parsed.password) if parsed.password else "")
        if api_key:
            self.headers["Authorization"] = f"ApiKey {api_key}"
        elif user:
            token = base64.b64encode(f"{user}:{secret}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"
        self._connection: http.client.HTTPConnection | None = None

    def _connect(self) -> http.client.HTTPConnection:
        if self._connection is None:
            if self.https:
                self._connection = http.client.HTTPSConnection(
                    self.host, self.port, timeout=self.timeout, context=self.ssl_context
                )
            else:
                self._connection = http.client.HTTPConnection(
                    self.host, self.port, timeout=self.timeout
                )
        return self._connection

    def send(self, lines: list[bytes]) -> None:
        body = b"[" + b",".join(lines) + b"]"
        try:
            connection = self._connect()
            connection.request("POST", self.path, body=body, headers=self.headers)
            response = connection.getresponse()
            response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise SinkError(f"{type(exc).__name__}: {exc}") from None
        if not 200 <= response.status < 300:
            raise SinkError(f"HTTP {response.status} {response.reason}")

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


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
            self._stopping = threading.Event()
            self._spool = Spool(
                os.path.join(self.spool_root, f"pid-{self._pid}"), self.spool_max_bytes
            )
            self._adopt_orphans(self._spool)
            self._thread = threading.Thread(target=self._run, name="log-shipper", daemon=True)
            self._thread.start()

    def _adopt_orphans(self, spool: Spool) -> None:
        """Take over spools left by processes that are gone (a restarted worker's children)."""
        for entry in sorted(os.listdir(self.spool_root)):
            if not entry.startswith("pid-") or entry == f"pid-{self._pid}":
                continue
            pid = int(entry[4:]) if entry[4:].isdigit() else 0
            if pid and _alive(pid):
                continue
            orphan = Spool(os.path.join(self.spool_root, entry), self.spool_max_bytes)
            while (batch := orphan.peek()) is not None:
                spool.push(batch)
                orphan.pop()
            with contextlib.suppress(OSError):
                os.rmdir(orphan.directory)

    # -- the background thread ----------------------------------------------------------------

    def _take(self) -> list[bytes]:
        queue, batch = self._queue, list[bytes]()
        while queue and len(batch) < self.batch_size:
            batch.append(queue.popleft())
        return batch

    def _run(self) -> None:
        spool = self._spool
        assert spool is not None
        delay, reported_drops = 0.5, 0
        while True:
            stopping = self._stopping.is_set()
            if not stopping:
                self._wake.wait(self.flush_interval)
                self._wake.clear()
            drops = self.dropped + spool.dropped_lines
            if drops != reported_drops:
                self._queue.append(self._drop_report(drops - reported_drops))
                reported_drops = drops
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
            except SinkError:
                self._spill(spool)
                return False
            spool.pop()
            self.sent += len(spooled)
        while batch := self._take():
            try:
                self.sink.send(batch)
            except SinkError:
                spool.push(batch)  # in order: everything after it follows into the spool
                self._spill(spool)
                return False
            self.sent += len(batch)
        return True

    def _spill(self, spool: Spool) -> None:
        while batch := self._take():
            spool.push(batch)

    def _drop_report(self, count: int) -> bytes:
        record = logging.LogRecord(
            "celery_obs.log_shipping",
            logging.WARNING,
            __file__,
            0,
            "log shipping dropped %d records (queue or spool full)",
            (count,),
            None,
        )
        record.ecs = {
            "event": {"action": "log-records-dropped", "outcome": "failure"},
            "labels": {"dropped_records": count},
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
        self.sink.close()
        super().close()
