"""The shipper under faults: long outages, a refusing disk, racing adopters, forks, batches the
sink refuses for good, a slow sink at shutdown. Each test keeps records or says what it lost."""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from pathlib import Path

from celery_obs.log_shipping import spool as spool_module
from celery_obs.log_shipping.shipper import ShippingHandler
from celery_obs.log_shipping.sinks import HttpSink
from celery_obs.log_shipping.spool import Spool

from log_receivers import logger_with
from support import free_port, wait_for


def numbers(records: list[dict]) -> list[int]:
    return [int(r["message"]) for r in records if r["message"].isdigit()]


def spooled_lines(root: Path) -> int:
    return sum(len(f.read_bytes().splitlines()) for f in root.rglob("*.ndjson"))


def test_a_long_outage_moves_the_queue_to_disk_instead_of_dropping(tmp_path) -> None:
    dead = HttpSink(f"http://127.0.0.1:{free_port()}/", timeout=1)
    # A 30 s backoff from the first failure: only spilling while backing off saves the lines
    # from the 100-line queue bound.
    handler = ShippingHandler(
        dead, str(tmp_path), max_queue=100, batch_size=50, backoff_start=30, backoff_cap=30
    )
    logger = logger_with(handler)
    for chunk in range(20):
        for i in range(50):
            logger.info("%d", chunk * 50 + i)
        wait_for(lambda: not handler.queued, 10, f"chunk {chunk} spilled to disk")
    handler.close()
    assert handler.dropped == 0
    assert spooled_lines(tmp_path) == 1000


class HalfWritten:
    """A file on a full disk: half the data reaches it, then ENOSPC."""

    def __init__(self, file) -> None:
        self.file = file

    def __enter__(self) -> HalfWritten:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()

    def write(self, data: bytes) -> int:
        self.file.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_disk_that_refuses_writes_moves_the_spool_to_memory_and_loses_nothing(
    receiver, tmp_path, monkeypatch
) -> None:
    """The same as test_log_losses.py's tmpfs test, for machines where no tmpfs can be
    mounted: here the disk is full after two batch files."""
    receiver.stop()
    handler = ShippingHandler(
        HttpSink(f"http://127.0.0.1:{receiver.port}/", timeout=1),
        str(tmp_path),
        batch_size=10,
        flush_interval=0.05,
        backoff_start=0.05,
        backoff_cap=0.1,
    )
    logger = logger_with(handler)
    fdopen, opened = os.fdopen, []

    def full_after_two_files(fd: int, *args, **kwargs):
        file = fdopen(fd, *args, **kwargs)
        opened.append(fd)
        return file if len(opened) <= 2 else HalfWritten(file)

    monkeypatch.setattr(spool_module.os, "fdopen", full_after_two_files)
    for i in range(100):
        logger.info("%d", i)
    wait_for(lambda: len(opened) > 2 and not handler.queued, 10, "the refused writes")
    assert list(tmp_path.rglob("*.tmp")) == []  # no half-written batch left behind
    assert handler.dropped == 0
    receiver.start()
    wait_for(lambda: len(numbers(receiver.records)) >= 100, 20, "every record")
    handler.close()
    monkeypatch.undo()
    assert numbers(receiver.records) == list(range(100))
    assert not [r for r in receiver.records if r.get("event", {}).get("action")]
    assert list(tmp_path.rglob("*.tmp")) == []


def test_an_unusable_spool_directory_falls_back_to_memory(receiver, tmp_path) -> None:
    not_a_directory = tmp_path / "spool"
    not_a_directory.write_text("a file where the spool should be")
    handler = ShippingHandler(
        HttpSink(f"http://127.0.0.1:{receiver.port}/", timeout=1),
        str(not_a_directory),
        flush_interval=0.05,
        backoff_cap=0.1,
    )
    logger = logger_with(handler)
    for i in range(100):
        logger.info("%d", i)  # never raises into the caller
    wait_for(lambda: len(receiver.records) >= 100, 20, "records shipped without a disk spool")
    handler.close()
    assert numbers(receiver.records) == list(range(100))


def test_a_spool_removed_between_open_and_lock_is_made_again(tmp_path, monkeypatch) -> None:
    flock = spool_module.fcntl.flock
    raced: list[bool] = []

    def adopter_wins_the_race(fd: int, operation: int) -> None:
        if not raced:  # another process adopts and removes the fresh, empty spool right now
            raced.append(True)
            shutil.rmtree(tmp_path / "pid-1")
        flock(fd, operation)

    monkeypatch.setattr(spool_module.fcntl, "flock", adopter_wins_the_race)
    spool = Spool(tmp_path / "pid-1", 1 << 20)
    spool.push([b'{"n":1}'])
    assert raced == [True]
    assert (tmp_path / "pid-1" / ".lock").exists()
    assert spool.peek() == [b'{"n":1}']
    spool.release()


def test_a_forked_child_starts_its_own_counts(receiver, tmp_path) -> None:
    handler = ShippingHandler(
        HttpSink(f"http://127.0.0.1:{receiver.port}/"), str(tmp_path), flush_interval=0.05
    )
    logger = logger_with(handler)
    logger.info("parent")
    wait_for(lambda: len(receiver.records) == 1, 10, "the parent's record")
    handler.dropped, handler.last_error = 7, "an earlier outage"  # the parent's history
    pid = os.fork()
    if pid == 0:  # the child: its first record starts its own thread and counts
        code = 1
        try:
            logger.info("child")
            ok = (handler.dropped, handler.last_error) == (0, None)
            deadline = time.monotonic() + 10
            while handler.sent < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            code = 0 if ok and handler.sent == 1 else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    handler.close()
    assert os.waitstatus_to_exitcode(status) == 0
    messages = [r["message"] for r in receiver.records if "event" not in r]
    assert messages == ["parent", "child"]
    # The parent reports its 7 drops; the child does not report them again.
    drops = [r for r in receiver.records if r.get("event", {}).get("action")]
    assert [r["labels"]["log_records_dropped"] for r in drops] == [7]


def test_a_batch_logstash_refuses_as_malformed_is_counted_not_retried(receiver, tmp_path) -> None:
    receiver.status = 400
    handler = ShippingHandler(
        HttpSink(f"http://127.0.0.1:{receiver.port}/"),
        str(tmp_path),
        flush_interval=0.05,
        backoff_cap=0.05,
    )
    logger = logger_with(handler)
    for i in range(10):
        logger.info("%d", i)
    wait_for(lambda: handler.sink.rejected == 10, 10, "the refused batch counted")  # type: ignore[attr-defined]
    receiver.status = 200
    logger.info("after")
    wait_for(lambda: any(r["message"] == "after" for r in receiver.records), 10, "the next")
    handler.close()
    actions = [r.get("event", {}).get("action") for r in receiver.records]
    assert actions.count("log-records-rejected") == 1
    assert numbers(receiver.records) == []  # never resent
    assert spooled_lines(tmp_path) == 0


class SlowSink:
    """Takes every batch, a quarter of a second each."""

    timeout = 0.5

    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def send(self, lines: list[bytes]) -> None:
        time.sleep(0.25)  # the sink's own latency, not a wait in the test
        self.lines += lines

    def close(self) -> None:
        pass


def test_close_keeps_its_time_budget_and_spools_the_rest(tmp_path) -> None:
    sink = SlowSink()
    handler = ShippingHandler(
        sink, str(tmp_path), batch_size=10, flush_interval=60, close_timeout=0.5
    )
    logger = logger_with(handler)
    for i in range(1000):  # 100 batches: 25 s at the sink's pace
        logger.info("%d", i)
    started = time.monotonic()
    handler.close()
    assert time.monotonic() - started < 0.5 + SlowSink.timeout + 1.0
    sent = [json.loads(line)["message"] for line in sink.lines]
    assert 0 < len(sent) < 1000
    assert len(sent) + spooled_lines(tmp_path) == 1000  # nothing lost, the rest on disk
