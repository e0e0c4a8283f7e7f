"""A real prefork worker with install() shipping to a local stand-in for Logstash's http input:
tasks keep running while Logstash is down, and every record arrives exactly once, in order per
process; what is queued when the worker stops is flushed before it exits."""

from __future__ import annotations

import json
import signal
import uuid
from collections import defaultdict
from pathlib import Path

import pytest

from log_receivers import HttpReceiver
from support import WorkerProcess, producer, wait_for

pytestmark = pytest.mark.broker


def shipping_worker(
    redis_url: str, queue: str, receiver: HttpReceiver, spool: Path, **env: str
) -> WorkerProcess:
    worker = WorkerProcess(
        redis_url,
        queue,
        f"ship-{uuid.uuid4().hex[:6]}",
        events=False,
        app="logging_app",
        env={
            "CELERY_OBS_LOG_OUTPUT": f"stdout,http://127.0.0.1:{receiver.port}/",
            "CELERY_OBS_LOG_SPOOL_DIR": str(spool),
            **env,
        },
        quiet=True,
    )
    wait_for(lambda: "ready" in worker.output(), 30, "the worker ready")
    return worker


def succeeded(records: list[dict]) -> set[str]:
    return {
        r["celery"]["task"]["id"]
        for r in records
        if r.get("event", {}).get("action") == "task-succeeded"
    }


def stdout_records(worker: WorkerProcess) -> list[dict]:
    return [json.loads(line) for line in worker.output().splitlines() if line.strip()]


def assert_each_tick_once_in_order(records: list[dict], total: int) -> None:
    ticks: dict[int, list[int]] = defaultdict(list)
    for r in records:
        if r["message"].startswith("tick "):
            ticks[r["process"]["pid"]].append(int(r["message"].split()[1]))
    assert {pid: seq for pid, seq in ticks.items()} == {
        pid: list(range(len(seq))) for pid, seq in ticks.items()
    }
    assert sum(len(seq) for seq in ticks.values()) == total


def assert_one_record_per_step(records: list[dict], ids: list[str]) -> None:
    steps: dict[str, list[str]] = defaultdict(list)
    for r in records:
        if r.get("log", {}).get("logger") == "celery_obs.lifecycle":
            steps[r["celery"]["task"]["id"]].append(r["event"]["action"])
    assert {i: steps[i] for i in ids} == {i: ["task-started", "task-succeeded"] for i in ids}


@pytest.mark.slow
def test_tasks_run_through_a_logstash_outage_and_every_record_arrives_once(
    redis_url, queue, receiver, tmp_path
) -> None:
    worker = shipping_worker(
        redis_url, queue, receiver, tmp_path, CELERY_OBS_LOG_FLUSH_INTERVAL="0.2"
    )
    try:
        app = producer(redis_url, queue)
        before = [app.send_task("logs.tick").id for _ in range(100)]
        wait_for(lambda: set(before) <= succeeded(receiver.records), 30, "shipped before")

        receiver.stop()
        during = [app.send_task("logs.tick").id for _ in range(300)]
        # The tasks keep running (their records are on stdout) while nothing reaches Logstash.
        wait_for(lambda: set(during) <= succeeded(stdout_records(worker)), 60, "tasks ran")
        wait_for(lambda: any(tmp_path.rglob("*.ndjson")), 20, "records spooled to disk")
        assert not set(during) & succeeded(receiver.records)

        receiver.start()
        after = [app.send_task("logs.tick").id for _ in range(100)]
        ids = before + during + after
        wait_for(lambda: set(ids) <= succeeded(receiver.records), 60, "every record shipped")
        assert_each_tick_once_in_order(receiver.records, 500)
        assert_one_record_per_step(receiver.records, ids)
        assert all(r["service"]["name"] == "obs-test" for r in receiver.records)
        worker.signal(signal.SIGTERM)
        assert worker.wait(20) == 0
    finally:
        worker.close()


def test_what_is_queued_at_shutdown_is_flushed_before_the_worker_exits(
    redis_url, queue, receiver, tmp_path
) -> None:
    # A minute between flushes: only the shutdown flush can deliver these records in time.
    worker = shipping_worker(
        redis_url, queue, receiver, tmp_path, CELERY_OBS_LOG_FLUSH_INTERVAL="60"
    )
    try:
        app = producer(redis_url, queue)
        ids = [app.send_task("logs.tick").id for _ in range(20)]
        wait_for(lambda: set(ids) <= succeeded(stdout_records(worker)), 30, "tasks ran")
        assert not succeeded(receiver.records)
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0
        assert_each_tick_once_in_order(receiver.records, 20)
        assert_one_record_per_step(receiver.records, ids)
        assert list(tmp_path.rglob("*.ndjson")) == []
    finally:
        worker.close()
