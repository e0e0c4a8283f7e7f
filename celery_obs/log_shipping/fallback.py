"""Spools in memory: `MemorySpool`, and `FallbackSpool`, the disk spool while the disk takes
writes and memory while it refuses them. Both bounded like the disk spool (oldest batches
dropped, counted), both gone with the process.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from pathlib import Path

from .spool import Spool, open_own_spool


def _size(lines: list[bytes]) -> int:
    return sum(len(line) + 1 for line in lines)


class MemorySpool:
    """The same interface in memory: bounded the same way (oldest dropped, counted), gone with
    the process."""

    def __init__(self, max_bytes: int) -> None:
        self.directory = Path("<memory>")
        self.max_bytes = max_bytes
        self.dropped_lines = 0
        self._batches: deque[list[bytes]] = deque()
        self._bytes = 0
        self._pinned: list[bytes] | None = None  # the batch being sent: never trimmed

    def __len__(self) -> int:
        return len(self._batches)

    @property
    def size(self) -> int:
        return self._bytes

    @property
    def lines(self) -> int:
        return sum(len(batch) for batch in self._batches)

    def push(self, lines: list[bytes]) -> None:
        batches = self._batches
        batches.append(list(lines))
        self._bytes += _size(lines)
        while self._bytes > self.max_bytes and len(batches) > 1:
            if batches[0] is not self._pinned:
                oldest = batches.popleft()
            elif len(batches) > 2:
                oldest = batches[1]
                del batches[1]
            else:
                return
            self.dropped_lines += len(oldest)
            self._bytes -= _size(oldest)

    def push_front(self, lines: list[bytes]) -> None:
        self._batches.appendleft(list(lines))
        self._bytes += _size(lines)

    def peek(self) -> list[bytes] | None:
        if not self._batches:
            return None
        self._pinned = self._batches[0]
        return list(self._pinned)

    def replace_oldest(self, lines: list[bytes]) -> None:
        self.pop()
        if lines:
            self.push_front(lines)

    def pop(self) -> None:
        self._pinned = None
        self._bytes -= _size(self._batches.popleft())

    def newest(self) -> list[bytes] | None:
        return list(self._batches[-1]) if self._batches else None

    def pop_newest(self) -> None:
        self._bytes -= _size(self._batches.pop())

    def release(self) -> None:
        pass


class FallbackSpool:
    """The disk spool while the disk takes writes; memory (bounded) when it refuses one (full,
    read-only, gone), back to disk once the memory part has drained. Order is kept: batches put
    back in front come first, then the disk's, then memory's, so disk batches are always older
    than memory ones. With no disk spool at all (an unusable directory) it is memory only.

    `on_fallback(error)` is told each time a disk write is refused (the shipper says so once).
    """

    def __init__(
        self,
        disk: Spool | None,
        memory_max_bytes: int,
        on_fallback: Callable[[OSError], None] = lambda error: None,
    ) -> None:
        self.disk = disk
        self.memory = MemorySpool(memory_max_bytes)
        self.front = MemorySpool(memory_max_bytes)  # put back while the disk refused it
        self.on_fallback = on_fallback
        self.directory = disk.directory if disk is not None else self.memory.directory
        self._peeked: Spool | MemorySpool | None = None

    def __len__(self) -> int:
        return len(self.front) + len(self.disk or ()) + len(self.memory)

    @property
    def dropped_lines(self) -> int:
        disk = self.disk.dropped_lines if self.disk is not None else 0
        return disk + self.memory.dropped_lines + self.front.dropped_lines

    @property
    def on_disk(self) -> bool:
        """Whether new batches go to disk (no memory part waiting)."""
        return self.disk is not None and not self.memory

    def memory_lines(self) -> int:
        return self.front.lines + self.memory.lines

    def push(self, lines: list[bytes]) -> None:
        if self.disk is not None and not self.memory:
            try:
                self.disk.push(lines)
                return
            except OSError as error:
                self.on_fallback(error)
        self.memory.push(lines)

    def push_front(self, lines: list[bytes]) -> None:
        if self.disk is not None and not self.front and (self.disk or not self.memory):
            try:
                self.disk.push_front(lines)
                return
            except OSError as error:
                self.on_fallback(error)
        if self.front or self.disk:
            self.front.push_front(lines)
        else:
            self.memory.push_front(lines)

    def _head(self) -> Spool | MemorySpool | None:
        if self.front:
            return self.front
        if self.disk:
            return self.disk
        return self.memory if self.memory else None

    def peek(self) -> list[bytes] | None:
        head = self._peeked = self._head()
        return None if head is None else head.peek()

    def pop(self) -> None:
        """Remove the batch `peek` returned (the oldest, unless a batch was put in front)."""
        head = self._peeked if self._peeked is not None else self._head()
        self._peeked = None
        if head is not None:
            head.pop()

    def replace_oldest(self, lines: list[bytes]) -> None:
        head = self._peeked if self._peeked is not None else self._head()
        self._peeked = None
        if head is None:
            return
        try:
            head.replace_oldest(lines)
        except OSError as error:  # the disk refused the rewrite: keep the rest in memory
            self.on_fallback(error)
            head.pop()
            if lines:
                self.front.push_front(lines)

    def flush_to_disk(self) -> None:
        """Move what waits in memory to disk if it takes it now (at close: for the next start).
        What it refuses stays in memory, in order."""
        if self.disk is None:
            return
        while (batch := self.memory.peek()) is not None:  # after the disk's, oldest first
            try:
                self.disk.push(batch)
            except OSError:
                return
            self.memory.pop()
        while (batch := self.front.newest()) is not None:  # before the disk's, newest first
            try:
                self.disk.push_front(batch)
            except OSError:
                return
            self.front.pop_newest()

    def release(self) -> None:
        if self.disk is not None:
            self.disk.release()


def open_spool(
    root: str | None,
    pid: int,
    disk_max_bytes: int,
    memory_max_bytes: int,
    on_fallback: Callable[[OSError], None],
) -> tuple[FallbackSpool, str | None]:
    """The spool policy: this process' own disk spool under `root` (adopting what dead
    processes left there), else memory only. Returns the spool and, when the disk could not be
    used, why (to be said once)."""
    disk: Spool | None = None
    problem = None
    if root is not None:
        try:
            disk = open_own_spool(root, pid, disk_max_bytes)
        except OSError as exc:  # keep shipping; hold back-ups in memory instead
            problem = f"log spool {root} unusable ({exc})"
    return FallbackSpool(disk, memory_max_bytes, on_fallback), problem
