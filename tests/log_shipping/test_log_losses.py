"""Every loss is bounded and reported: the shipper against receivers that misbehave (slow,
refusing large bodies, gone) and disks that refuse writes (a real 64 KB tmpfs), records that
are huge or recursive, and a process killed with SIGKILL. Where a number is known it is
asserted exactly: records logged == records received + records reported lost."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from celery_obs.log_shipping.fallback import MemorySpool
from celery_obs.log_shipping.shipper import ShippingHandler
from celery_obs.log_shipping.sinks import HttpSink
from celery_obs.log_shipping.spool import Spool

from log_receivers import logger_with
from support import TESTS, wait_for

ROOT = TESTS.parent


def numbers(records: list[dict]) -> list[int]:
    return [int(r["message"]) for r in records if r["message"].isdigit()]


def reported(records: list[dict], action: str) -> int:
    label = action.replace("-", "_")
    return sum(r["labels"][label] for r in records if r.get("event", {}).get("action") == action)


def spooled_lines(root: Path) -> int:
    return sum(len(f.read_bytes().splitlines()) for f in root.rglob("*.ndjson"))


class Said(logging.Handler):
    """What the shipper says about itself (on the worker's stderr, through Celery)."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def said() -> Iterator[Said]:
    status = logging.getLogger("celery_obs.log_shipping")
    handler = Said()
    status.addHandler(handler)
    yield handler
    status.removeHandler(handler)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KB filesystem (tmpfs), so "disk full" is the kernel's ENOSPC."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(  # test_log_shipper_faults.py covers the same with a monkeypatched ENOSPC
            f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}): needs root"
        )
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_slow_sink_spills_to_the_spool_instead_of_dropping(receiver, tmp_path) -> None:
    receiver.delay = 0.05  # 500 records per 50 ms at best: far slower than the logging
    handler = ShippingHandler(
        HttpSink(f"http://127.0.0.1:{receiver.port}/", timeout=5),
        str(tmp_path),
        max_queue=1000,
        flush_interval=0.05,
    )
    logger = logger_with(handler)
    for i in range(30_000):  # 30 times the queue's bound, logged in well under a second
        logger.info("%d", i)
    wait_for(lambda: len(receiver.records) >= 30_000, 60, "every record")
    handler.close()
    assert handler.dropped == 0
    assert numbers(receiver.records) == list(range(30_000))  # exactly once, in order
    assert reported(receiver.records, "log-records-dropped") == 0
    assert spooled_lines(tmp_path) == 0


def test_one_record_too_large_for_the_receiver_is_refused_alone(receiver, tmp_path) -> None:
    receiver.max_body = 64 * 1024  # a proxy's body limit: HTTP 413 above it
    handler = ShippingHandler(
        HttpSink(f"http://127.0.0.1:{receiver.port}/", timeout=5),
        str(tmp_path),
        batch_size=100,
        flush_interval=0.05,
    )
    logger = logger_with(handler)
    huge = {50, 150, 250}
    for i in range(300):
        if i in huge:
            logger.info("huge %d %s", i, "x" * 100_000)  # over the limit on its own
        else:
            logger.info("%d", i)
    wait_for(
        lambda: (
            reported(receiver.records, "log-records-rejected") == 3
            and 299 in numbers(receiver.records)
        ),
        30,
        "the small records and a report of the huge ones",
    )
    handler.close()
    assert numbers(receiver.records) == [i for i in range(300) if i not in huge]
    assert not [r for r in receiver.records if r["message"].startswith("huge")]
    reports = [r for r in receiver.records if r.get("event", {}).get("action")]
    assert reports
    assert all("HTTP 413" in r["message"] for r in reports)


def test_a_recursive_extra_is_shipped_with_the_cycle_marked(receiver, tmp_path) -> None:
    handler = ShippingHandler(
        HttpSink(f"http://127.0.0.1:{receiver.port}/"), str(tmp_path), flush_interval=0.05
    )
    logger = logger_with(handler)
    d: dict = {"name": "loop"}
    d["self"] = d
    logger.info("x", extra={"d": d, "l": [d]})
    logger.info("after")
    wait_for(lambda: len(receiver.records) == 2, 10, "both records")
    handler.close()
    first, second = receiver.records
    assert first["d"] == {"name": "loop", "self": "[circular]"}
    assert first["l"] == [{"name": "loop", "self": "[circular]"}]
    assert second["message"] == "after"


def test_a_full_disk_moves_the_spool_to_memory_and_loses_nothing(
    receiver, small_disk, said
) -> None:
    receiver.stop()  # Logstash is down: everything must be spooled
    handler = ShippingHandler(
        HttpSink(f"http://127.0.0.1:{receiver.port}/", timeout=1),
        str(small_disk),
        batch_size=20,  # about 11 KB a batch file: the disk takes a few, then refuses
        flush_interval=0.05,
        backoff_start=0.05,
        backoff_cap=0.2,
    )
    logger = logger_with(handler)
    for i in range(5000):  # about 3 MB of records for a 64 KB disk
        logger.info("%d", i)
    wait_for(lambda: any("refused a write" in m for m in said.messages), 20, "the fallback")
    wait_for(lambda: not handler.queued, 20, "the queue spooled")
    receiver.start()
    wait_for(lambda: len(numbers(receiver.records)) >= 5000, 60, "every record")
    handler.close()
    assert numbers(receiver.records) == list(range(5000))  # none lost, in order
    assert handler.dropped == 0
    assert reported(receiver.records, "log-records-dropped") == 0
    [fallback] = [m for m in said.messages if "refused a write" in m]  # said once
    assert "No space left on device" in fallback
    assert list(small_disk.rglob("*.tmp")) == []
    assert spooled_lines(small_disk) == 0


class WatchedSink(HttpSink):
    """An HttpSink that notes when it was asked to send a loss report."""

    report_tried = False

    def send(self, lines: list[bytes]) -> None:
        self.report_tried |= any(b'"log-records-dropped"' in line for line in lines)
        super().send(lines)


def test_a_full_disk_and_a_full_memory_report_every_record_they_drop(receiver, small_disk) -> None:
    receiver.stop()
    sink = WatchedSink(f"http://127.0.0.1:{receiver.port}/", timeout=1)
    handler = ShippingHandler(
        sink,
        str(small_disk),
        batch_size=20,
        flush_interval=0.05,
        backoff_start=0.05,
        backoff_cap=0.2,
        report_interval=0.05,
        memory_spool_max_bytes=200 * 1024,  # past the disk, room for a few hundred records
    )
    logger = logger_with(handler)
    for i in range(2500):
        logger.info("%d", i)
    # A report of these losses is due, but cannot be sent: it must outlive what comes next.
    wait_for(lambda: handler.dropped > 0 and sink.report_tried, 20, "a report tried")
    for i in range(2500, 5000):  # more losses: the oldest records in memory go
        logger.info("%d", i)
    wait_for(lambda: not handler.queued, 20, "the queue spooled")
    receiver.start()

    def accounted() -> bool:
        received = len(numbers(receiver.records))
        return received + reported(receiver.records, "log-records-dropped") == 5000

    wait_for(accounted, 60, "records received + reported lost == records logged")
    handler.close()
    got = numbers(receiver.records)
    assert got == sorted(got)
    assert len(set(got)) == len(got)
    assert len(got) + reported(receiver.records, "log-records-dropped") == 5000
    assert 0 < reported(receiver.records, "log-records-dropped") == handler.dropped
    assert list(small_disk.rglob("*.tmp")) == []


def test_a_huge_records_flood_stays_within_the_memory_bounds() -> None:
    """A sink that never answers and no disk: 1,000 records of 200 KB (200 MB) must cost the
    process the queue's and the memory spool's byte bounds (16 + 32 MB), not their size,
    though they are far below the queue's 10,000-line bound."""
    script = textwrap.dedent(
        """
        import json, os, socket, sys
        from celery_obs.log_shipping.shipper import ShippingHandler
        from celery_obs.log_shipping.sinks import HttpSink
        from log_receivers import logger_with

        def rss_mb():
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024

        silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/"
        # spill_after: only the bounds may move the queue to the (memory) spool here
        handler = ShippingHandler(HttpSink(url, timeout=60), None, spill_after=600)
        logger = logger_with(handler)
        logger.info("warm up")
        before = rss_mb()
        for i in range(1000):
            logger.info("%d %s", i, "x" * 200_000)
        print(json.dumps({"grew_mb": rss_mb() - before, "dropped": handler.dropped}))
        sys.stdout.flush()
        os._exit(0)  # not close(): it would wait out the request that never ends
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])},
    )
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.splitlines()[-1])
    assert measured["grew_mb"] < 100, measured
    assert measured["dropped"] > 700, measured  # counted: 48 MB hold about 240 of them


SIGKILLED = textwrap.dedent(
    """
    import signal, sys, time
    from celery_obs.log_shipping.shipper import ShippingHandler
    from celery_obs.log_shipping.sinks import HttpSink
    from log_receivers import logger_with

    url, spool = sys.argv[1], sys.argv[2]
    handler = ShippingHandler(
        HttpSink(url, timeout=60), spool, spill_after=0.5, backoff_start=60, backoff_cap=60,
        flush_interval=0.05,
    )
    logger = logger_with(handler)
    logger.info("0")
    print("first", flush=True)
    sys.stdin.readline()  # the test says when the first record is on its way (or failed)
    for i in range(1, 51):
        logger.info("%d", i)
    print("logged", flush=True)
    signal.pause()
    """
)


@pytest.mark.parametrize("sink", ["down", "stuck"])
def test_sigkill_loses_at_most_what_came_in_the_last_spill_after_seconds(
    receiver, tmp_path, sink
) -> None:
    """Down: the sink refuses and the sender backs off for a minute. Stuck: the sender waits
    a minute for an answer. Either way the records logged meanwhile are on disk within
    `spill_after` (0.5 s) and a tick, before a SIGKILL; the next start sends them."""
    spool = tmp_path / "spool"
    if sink == "down":
        receiver.stop()
    else:
        receiver.delay = 60
    child = subprocess.Popen(
        [sys.executable, "-c", SIGKILLED, f"http://127.0.0.1:{receiver.port}/", str(spool)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])},
    )
    try:
        assert child.stdout is not None
        assert child.stdin is not None
        assert child.stdout.readline() == "first\n"
        if sink == "down":  # the first send failed: "0" is back on disk, the sender waits
            wait_for(lambda: spooled_lines(spool) == 1, 10, "the failed batch spooled")
        else:  # "0" is in flight, and will stay so
            wait_for(lambda: receiver.requests == 1, 10, "the first request in flight")
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline() == "logged\n"
        on_disk = 51 if sink == "down" else 50
        wait_for(lambda: spooled_lines(spool) == on_disk, 1.5, "every record on disk")
    finally:
        child.kill()
        child.wait(10)
        for pipe in (child.stdin, child.stdout):
            if pipe is not None:
                pipe.close()
    if sink == "down":
        receiver.start()
    else:
        receiver.delay = 0
    handler = ShippingHandler(
        HttpSink(f"http://127.0.0.1:{receiver.port}/"), str(spool), flush_interval=0.05
    )
    logger_with(handler).info("restarted")  # starts it: it adopts the dead process' spool
    wait_for(lambda: 50 in numbers(receiver.records), 20, "the killed process' records")
    handler.close()
    expected = list(range(51)) if sink == "down" else list(range(1, 51))
    assert [n for n in numbers(receiver.records) if n in expected] == expected
    with contextlib.suppress(ProcessLookupError):
        os.kill(child.pid, signal.SIGKILL)


@pytest.mark.parametrize("kind", ["disk", "memory"])
def test_the_batch_being_sent_is_never_trimmed_under_the_sender(tmp_path, kind) -> None:
    """The spiller pushes while the sender sends the oldest batch: the bound drops others
    (counted), so that popping after the send removes exactly the batch that was sent."""
    spool = Spool(tmp_path, max_bytes=100) if kind == "disk" else MemorySpool(100)
    spool.push([b"a" * 40])  # one line
    assert spool.peek() == [b"a" * 40]  # being sent
    for i in range(5):
        spool.push([b"%d" % i * 20, b"%d" % i * 20])  # two lines each: 42 bytes
    spool.pop()  # sent
    left = []
    while (batch := spool.peek()) is not None:
        left += batch
        spool.pop()
    assert left == [b"4" * 20, b"4" * 20]
    assert 1 + spool.dropped_lines + len(left) == 11  # every line sent, dropped or left
