"""A bounded on-disk FIFO of log batches, for when the log pipeline is down.

One file per batch (`<sequence>.ndjson`, written to a temporary name and renamed, so a crash
never leaves half a batch), read back oldest first. Past `max_bytes` the oldest batches are
deleted and their lines counted as dropped: an outage longer than the spool loses the oldest
records, says how many, and keeps the newest.
"""

from __future__ import annotations

import os
from pathlib import Path


class Spool:
    def __init__(self, directory: str | os.PathLike[str], max_bytes: int) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.dropped_lines = 0
        self._files = sorted(self.directory.glob("*.ndjson"))  # left by an earlier run: resend
        self._sequence = int(self._files[-1].stem) + 1 if self._files else 0
        self._bytes = sum(f.stat().st_size for f in self._files)

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
        tmp.write_bytes(data)
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
        tmp.write_bytes(data)
        self._bytes += len(data) - oldest.stat().st_size
        tmp.rename(oldest)

    def pop(self) -> None:
        oldest = self._files.pop(0)
        self._bytes -= oldest.stat().st_size
        oldest.unlink()
