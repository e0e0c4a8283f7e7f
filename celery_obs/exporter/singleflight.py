"""Share one result among concurrent callers: scrapes arriving while /metrics is being rendered
wait for that rendering instead of starting their own (1,000 concurrent scrapes, one render)."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar, cast

T = TypeVar("T")


class SingleFlight(Generic[T]):
    """Runs `fn` once for all concurrent callers: a caller arriving while a call is in progress
    waits for it and shares its result (or its exception) instead of starting another."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self._fn = fn
        self._lock = threading.Lock()
        self._flight: _Flight[T] | None = None

    @property
    def waiting(self) -> int:
        """Callers waiting on the call in progress (0 when none is)."""
        flight = self._flight
        return flight.waiting if flight is not None else 0

    def __call__(self) -> T:
        with self._lock:
            flight = self._flight
            leader = flight is None
            if flight is None:
                flight = self._flight = _Flight()
            else:
                flight.waiting += 1
        if leader:
            try:
                flight.result = self._fn()
            except Exception as exc:
                flight.error = exc
            finally:
                with self._lock:
                    self._flight = None
                flight.done.set()
        else:
            flight.done.wait()
        if flight.error is not None:
            raise flight.error
        return cast(T, flight.result)


@dataclass
class _Flight(Generic[T]):
    done: threading.Event = field(default_factory=threading.Event)
    waiting: int = 0
    result: T | None = None
    error: Exception | None = None


class Rendered:
    """One rendering of /metrics; its gzip is made once, by the first caller who wants it."""

    def __init__(self, body: bytes, content_type: str) -> None:
        self.body = body
        self.content_type = content_type
        self._gzipped: bytes | None = None
        self._lock = threading.Lock()

    def gzipped(self) -> bytes:
        with self._lock:
            if self._gzipped is None:
                self._gzipped = gzip.compress(self.body, compresslevel=1, mtime=0)
            return self._gzipped
