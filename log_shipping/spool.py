"""A bounded on-disk FIFO of log batches, for when the log pipeline is down.

One file per batch (`<sequence>.ndjson`, written to a temporary name and renamed, so a crash
never leaves half a batch), read back oldest first. Past `max_bytes` the oldest batches are
deleted and their lines counted as dropped: an outage longer than the spool loses the oldest
records, says how many, and keeps the newest.

A spool is owned by the process holding an exclusive `flock` on its `.lock` file, for as long
as it runs: the kernel releases it when the process dies, so "can I lock it?" is exactly "is
its owner gone?". Process ids cannot tell: in a container they restart from 1, and workers
sharing a spool volume have overlapping ids.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


class SpoolBusy(OSError):
    """Another live process owns this spool."""


class Spool:
    def __init__(self, directory: str | os.PathLike[str], max_bytes: int) -> None:
        """Open and own the spool at `directory`; SpoolBusy if a live process owns it."""
        self.directory = Path(directory)
        self._lock_fd = self._lock()
        self.max_bytes = max_bytes
        self.dropped_lines = 0
        self._files = sorted(self.directory.glob("*.ndjson"))  # left by an earlier run: resend
        self._sequence = int(self._files[-1].stem) + 1 if self._files else 0
        self._bytes = sum(f.stat().st_size for f in self._files)

    def _lock(self) -> int:
        # Private: the records are the workers' logs. Another process adopting a spool can
        # delete it between our open and our flock; then we locked a deleted file: start over.
        lock = self.directory / ".lock"
        for _ in range(10):
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise SpoolBusy(f"{self.directory} is owned by a running process") from None
            try:
                if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)
        raise SpoolBusy(f"{self.directory} keeps being removed under us")

    def __len__(self) -> int:
        return len(self._files)

    @property
    def size(self) -> int:
        return self._bytes

    def push(self, lines: list[bytes]) -> None:
        data = b"\n".join(lines) + b"\n"
        path = self.directory / f"{self._sequence:012d}.ndjson"
        self._sequence += 1
        tmp = path.with_suffix(".tmp")
        _write_private(tmp, data)
        tmp.rename(path)
        self._files.append(path)
        self._bytes += len(data)
        while self._bytes > self.max_bytes and len(self._files) > 1:
            oldest = self._files.pop(0)
            self.dropped_lines += oldest.read_bytes().count(b"\n")
            self._bytes -= oldest.stat().st_size
            oldest.unlink()

    def peek(self) -> list[bytes] | None:
        """The oldest batch, or None when the spool is empty."""
        if not self._files:
            return None
        return self._files[0].read_bytes().splitlines()

    def replace_oldest(self, lines: list[bytes]) -> None:
        """Keep only `lines` of the oldest batch (the rest were delivered); atomic like push."""
        if not lines:
            self.pop()
            return
        oldest = self._files[0]
        data = b"\n".join(lines) + b"\n"
        tmp = oldest.with_suffix(".tmp")
        _write_private(tmp, data)
        self._bytes += len(data) - oldest.stat().st_size
        tmp.rename(oldest)

    def release(self) -> None:
        """Let go of the spool (its batches stay for whoever opens it next). In a forked child
        this drops only the inherited copy: the parent's lock lives on in its own descriptor,
        as long as nobody calls flock(LOCK_UN), which would unlock it for both."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def remove(self) -> None:
        """Delete an emptied spool (an orphan taken over) and let go of it."""
        for leftover in self.directory.glob("*.tmp"):  # a crash between write and rename
            leftover.unlink()
        with contextlib.suppress(OSError):
            (self.directory / ".lock").unlink()
            self.directory.rmdir()
        self.release()

    def pop(self) -> None:
        oldest = self._files.pop(0)
        self._bytes -= oldest.stat().st_size
        oldest.unlink()


class MemorySpool:
    """Stands in for the disk spool when the disk refuses (full, unwritable, not a directory):
    same interface, bounded the same way, gone with the process."""

    def __init__(self, max_bytes: int) -> None:
        self.directory = Path("<memory>")
        self.max_bytes = max_bytes
        self.dropped_lines = 0
        self._batches: list[list[bytes]] = []
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._batches)

    @property
    def size(self) -> int:
        return self._bytes

    def push(self, lines: list[bytes]) -> None:
        self._batches.append(list(lines))
        self._bytes += sum(len(line) + 1 for line in lines)
        while self._bytes > self.max_bytes and len(self._batches) > 1:
            oldest = self._batches.pop(0)
            self.dropped_lines += len(oldest)
            self._bytes -= sum(len(line) + 1 for line in oldest)

    def peek(self) -> list[bytes] | None:
        return list(self._batches[0]) if self._batches else None

    def replace_oldest(self, lines: list[bytes]) -> None:
        self.pop()
        if lines:
            self._batches.insert(0, list(lines))
            self._bytes += sum(len(line) + 1 for line in lines)

    def pop(self) -> None:
        self._bytes -= sum(len(line) + 1 for line in self._batches.pop(0))

    def release(self) -> None:
        pass


#: Either spool: the shipper does not care which.
AnySpool = Spool | MemorySpool
