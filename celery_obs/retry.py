"""The retry arithmetic every loop that waits for something shares: capped exponential
backoff (the exporter's broker consumer, the log shipper's sender) and a deadline (the setup
clients' --wait). Clocks are injected, so the loops' tests need not wait in real time."""

from __future__ import annotations

import time
from collections.abc import Callable


class Backoff:
    """Delays of `start`, twice that, ... up to `cap`; `reset()` after a success."""

    def __init__(self, start: float, cap: float) -> None:
        if not 0 < start <= cap:
            raise ValueError(f"backoff needs 0 < start <= cap, got start={start}, cap={cap}")
        self.start = start
        self.cap = cap
        self._next = start

    def next(self) -> float:
        """The delay to wait now; the one after it doubles (to the cap)."""
        delay = self._next
        self._next = min(delay * 2, self.cap)
        return delay

    def reset(self) -> None:
        self._next = self.start


class Deadline:
    """A point `seconds` from now on `clock`."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.at = clock() + max(seconds, 0.0)

    def passed(self) -> bool:
        return self.clock() >= self.at

    def remaining(self) -> float:
        return max(self.at - self.clock(), 0.0)

    def pause(self, most: float) -> float:
        """How long to sleep before the next attempt: `most`, or what is left if less."""
        return min(most, self.remaining())
