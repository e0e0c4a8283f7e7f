"""A bounded on-disk FIFO of log batches, for when the log pipeline is down or slow (memory
stands in when the disk refuses: `fallback.py`).

One file per batch (`<sequence>.ndjson`, written to a temporary name and renamed, so a
crash never leaves half a batch; a failed write removes its temporary file), read back oldest
first. A batch whose send failed goes back in front (a smaller sequence number), so batches
spilled meanwhile stay behind it. Past `max_bytes` the oldest batches are deleted and their
lines counted as dropped: an outage longer than the spool loses the oldest records, says how
many, and keeps the newest.

A disk spool is owned by the process holding an exclusive `flock` on its `.lock` file, for as
long as it runs: the kernel releases it when the process dies, so "can I lock it?" is exactly
"is its owner gone?". Process ids cannot tell: in a container they restart from 1, and workers
sharing a spool volume have overlapping ids.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections import deque
from pathlib import Path


def _write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` (mode 0600), or raise with no file left behind."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise


def _sequence(path: Path) -> int | None:
    try:
        return int(path.stem)
    except ValueError:
        return None


def _batches(directory: Path) -> list[Path]:
    """The batch files of a spool directory, oldest first (by number: they may be negative)."""
    numbered = [(n, p) for p in directory.glob("*.ndjson") if (n := _sequence(p)) is not None]
    return [p for _, p in sorted(numbered)]


def _lines(data: bytes) -> list[bytes]:
    return data.splitlines()


class SpoolBusy(OSError):
    """Another live process owns this spool."""


class Spool:
    def __init__(self, directory: str | os.PathLike[str], max_bytes: int) -> None:
        """Open and own the spool at `directory`; SpoolBusy if a live process owns it."""
        self.directory = Path(directory)
        self._lock_fd = self._lock()
        self.max_bytes = max_bytes
        self.dropped_lines = 0
        for leftover in self.directory.glob("*.tmp"):  # its writer died between write and rename
            with contextlib.suppress(OSError):
                leftover.unlink()
        self._files = deque(_batches(self.directory))  # left by an earlier run: resend
        self._next = (_sequence(self._files[-1]) or 0) + 1 if self._files else 0
        self._bytes = sum(f.stat().st_size for f in self._files)
        self._pinned: Path | None = None  # the batch being sent: never trimmed under it

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

    def _path(self, sequence: int) -> Path:
        return self.directory / f"{sequence:012d}.ndjson"

    def _write(self, path: Path, lines: list[bytes]) -> int:
        data = b"\n".join(lines) + b"\n"
        tmp = path.with_suffix(".tmp")
        _write_private(tmp, data)
        try:
            tmp.rename(path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return len(data)

    def push(self, lines: list[bytes]) -> None:
        """Append a batch (OSError, and nothing written, when the disk refuses)."""
        path = self._path(self._next)
        self._bytes += self._write(path, lines)
        self._next += 1
        self._files.append(path)
        self._trim()

    def push_front(self, lines: list[bytes]) -> None:
        """Put a batch back before every other one (its send failed)."""
        if not self._files:
            self.push(lines)
            return
        path = self._path((_sequence(self._files[0]) or 0) - 1)
        self._bytes += self._write(path, lines)
        self._files.appendleft(path)
        self._trim()

    def adopt(self, batch: Path) -> None:
        """Move another spool's batch file in, at the end: a rename, so a full disk can too."""
        path = self._path(self._next)
        size = batch.stat().st_size
        batch.rename(path)
        self._next += 1
        self._files.append(path)
        self._bytes += size
        self._trim()

    def _trim(self) -> None:
        files = self._files
        while self._bytes > self.max_bytes and len(files) > 1:
            if files[0] != self._pinned:
                oldest = files.popleft()
            elif len(files) > 2:
                oldest = files[1]
                del files[1]
            else:
                return
            try:
                data = oldest.read_bytes()
                oldest.unlink()
            except OSError:
                data = b""
            self.dropped_lines += data.count(b"\n")
            self._bytes -= len(data)

    def peek(self) -> list[bytes] | None:
        """The oldest batch, or None when the spool is empty. It stays until `pop` (or
        `replace_oldest`): batches pushed meanwhile never push it out of the bound."""
        while self._files:
            try:
                lines = _lines(self._files[0].read_bytes())
            except FileNotFoundError:  # removed by hand: nothing left to send from it
                self._files.popleft()
                continue
            self._pinned = self._files[0]
            return lines
        return None

    def replace_oldest(self, lines: list[bytes]) -> None:
        """Keep only `lines` of the oldest batch (the rest were delivered); atomic like push."""
        if not lines:
            self.pop()
            return
        oldest = self._files[0]
        before = oldest.stat().st_size
        self._bytes += self._write(oldest, lines) - before

    def pop(self) -> None:
        oldest = self._files.popleft()
        self._pinned = None
        with contextlib.suppress(OSError):
            self._bytes -= oldest.stat().st_size
            oldest.unlink()

    def release(self) -> None:
        """Let go of the spool (its batches stay for whoever opens it next). In a forked child
        this drops only the inherited copy: the parent's lock lives on in its own descriptor,
        as long as nobody calls flock(LOCK_UN), which would unlock it for both."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def batch_files(self) -> list[Path]:
        return list(self._files)

    def remove(self) -> None:
        """Delete an emptied spool (an orphan taken over) and let go of it."""
        with contextlib.suppress(OSError):
            (self.directory / ".lock").unlink()
            self.directory.rmdir()
        self.release()


def open_own_spool(root: str, pid: int, max_bytes: int) -> Spool:
    """This process' own spool under `root`, with the batches of dead processes' spools moved
    in (in order, by renames: a full disk allows them, and nothing is copied)."""
    os.makedirs(root, mode=0o700, exist_ok=True)
    name = f"pid-{pid}"
    for attempt in range(100):
        try:
            spool = Spool(os.path.join(root, name), max_bytes)
            break
        except SpoolBusy:  # the same pid in another container sharing the spool volume
            name = f"pid-{pid}-{attempt + 1}"
    else:
        raise SpoolBusy(f"no free spool directory under {root}")
    _adopt_orphans(root, spool, max_bytes)
    return spool


def _adopt_orphans(root: str, spool: Spool, max_bytes: int) -> None:
    """Take over spools whose owner is gone (a restarted worker's processes): being able to
    lock one means its owner died. Of the pool children that start together, the one holding
    the lock moves the batch files into its own spool; the rest skip it."""
    for entry in sorted(os.listdir(root)):
        path = os.path.join(root, entry)
        if not entry.startswith("pid-") or path == str(spool.directory):
            continue
        try:
            orphan = Spool(path, max_bytes)
        except OSError:  # SpoolBusy: its owner runs; or it vanished meanwhile
            continue
        try:
            for batch in orphan.batch_files():
                spool.adopt(batch)
        except OSError:
            orphan.release()  # what is left stays for the next start
            continue
        orphan.remove()
