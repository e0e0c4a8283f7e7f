"""The in-memory queue between a task's log call and the shipping threads.

Bounded by lines and by bytes (a few huge records must not take the worker's memory). Past
half a bound the spilling thread is woken; past a bound the logging thread moves a batch to the
spool itself if nobody else is using it, and only then drops the oldest lines, counted.
`put` and `trim` are called by the logging threads, serialised by the handler's own lock;
`take` by whoever holds the shipper's order lock; each counter below has one writer.

How long lines wait is known without a clock read per line: the spilling thread marks, on each
of its ticks, how many lines had been put by then (`mark`), and the oldest line's age is
bounded by the mark it came after (`oldest_age`).
"""

from __future__ import annotations

from collections import deque

READY, SPILL, FULL = 1, 2, 3


class LineQueue:
    def __init__(
        self, max_lines: int, max_bytes: int, ready_lines: int = 1, created: float = 0.0
    ) -> None:
        self.max_lines = max_lines
        self.ready_lines = ready_lines  # a batch's worth: time to send
        self.max_bytes = max_bytes
        self.high_lines = max(1, max_lines // 2)  # past half a bound: time to spill
        self.high_bytes = max(1, max_bytes // 2)
        self._lines: deque[bytes] = deque()
        self._put_bytes = 0  # written by put only
        self._check_at = self.high_bytes  # _put_bytes past which put looks at the size
        self.dropped = 0  # lines, written by put only
        self._dropped_bytes = 0
        self.taken = 0  # lines, written by take only
        self._taken_bytes = 0
        # (lines put by then, when): the first lines were put after the queue was made
        self._marks: deque[tuple[int, float]] = deque([(0, created)])

    def __len__(self) -> int:
        return len(self._lines)

    @property
    def nbytes(self) -> int:
        return self._put_bytes - self._taken_bytes - self._dropped_bytes

    def over_high_water(self) -> bool:
        return len(self._lines) >= self.high_lines or self.nbytes >= self.high_bytes

    def put(self, line: bytes) -> int:
        """Queue `line`. 0, or READY when a batch's worth is queued, SPILL when past half a
        bound, FULL when past a bound (the caller spills, or `trim`s)."""
        lines = self._lines
        lines.append(line)
        self._put_bytes += len(line)
        if len(lines) < self.ready_lines and self._put_bytes < self._check_at:
            return 0  # every log call: as little as that
        return self._state()

    def _state(self) -> int:
        size = self.nbytes
        count = len(self._lines)
        # Takes only shrink the queue: below this many bytes put, it cannot be past half.
        self._check_at = self._put_bytes + max(0, self.high_bytes - size)
        if count > self.max_lines or size > self.max_bytes:
            return FULL
        if count >= self.high_lines or size >= self.high_bytes:
            return SPILL
        return READY if count >= self.ready_lines else 0

    def trim(self) -> None:
        """Drop the oldest lines, counted, until the queue is within its bounds (the newest
        line stays, however large)."""
        lines = self._lines
        while len(lines) > 1 and (len(lines) > self.max_lines or self.nbytes > self.max_bytes):
            try:
                oldest = lines.popleft()
            except IndexError:  # taken meanwhile
                return
            self.dropped += 1
            self._dropped_bytes += len(oldest)

    def take(self, max_lines: int, max_bytes: int) -> list[bytes]:
        """The oldest lines, at most `max_lines` and `max_bytes` (but at least one line)."""
        lines, batch, size = self._lines, list[bytes](), 0
        while len(batch) < max_lines:
            try:
                line = lines.popleft()
            except IndexError:
                break
            if batch and size + len(line) > max_bytes:
                lines.appendleft(line)  # still the oldest: it starts the next batch
                break
            batch.append(line)
            size += len(line)
        self.taken += len(batch)
        self._taken_bytes += size
        return batch

    def mark(self, now: float) -> None:
        """Note that every line put so far was put by `now` (called on a steady tick)."""
        gone = self.taken + self.dropped
        self._marks.append((gone + len(self._lines), now))
        marks = self._marks
        while len(marks) > 1 and marks[1][0] <= gone:
            marks.popleft()

    def oldest_age(self, now: float) -> float:
        """An upper bound of how long the oldest queued line has waited (0 when none): it
        was put after the latest mark that counts fewer lines than it is."""
        if not self._lines:
            return 0.0
        return now - self._marks[0][1]
