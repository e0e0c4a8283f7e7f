"""Real layer: what runs and waits now, on a real prefork worker (one process, prefetch 1), on
Redis and RabbitMQ. A task that runs until the test lets it shows in `celery_task_active` with an
age that grows between scrapes, the task prefetched behind it in `celery_task_waiting` and the
worker's reserved count; both disappear when they finish and the last-success time moves. A
SIGKILLed worker's tasks stop counting and are counted as lost."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from support import ExporterProcess, producer, send_many, wait_for

pytestmark = pytest.mark.broker

TASK = "obs.wait_for"


def gauges(exporter: ExporterProcess, queue: str) -> tuple:
    scrape = exporter.scrape()
    labels = {"name": TASK, "queue_name": queue}
    return (
        scrape.value("celery_task_active", **labels),
        scrape.value("celery_task_waiting", **labels),
    )


def age(exporter: ExporterProcess, queue: str, which: str) -> float | None:
    return exporter.scrape().value(
        f"celery_task_oldest_{which}_age_seconds", name=TASK, queue_name=queue
    )


def start_blocked(broker_url, queue, start_exporter, start_worker, tmp_path: Path):
    """A one-process worker running one blocked task with a second one prefetched."""
    exporter = start_exporter(broker_url)
    worker = start_worker(broker_url, queue, "running", concurrency=1)
    exporter.wait_value("celery_worker_up", 1, hostname=worker.hostname)
    release = tmp_path / "release"
    app = producer(broker_url, queue)
    send_many(app, [(TASK, (str(release),), {}), (TASK, (str(release),), {})])
    wait_for(lambda: gauges(exporter, queue) == (1, 1), 30, "one running, one prefetched")
    return exporter, worker, release


def test_a_running_task_ages_until_it_ends_and_its_success_is_stamped(
    broker_url, queue, start_exporter, start_worker, tmp_path
) -> None:
    exporter, worker, release = start_blocked(
        broker_url, queue, start_exporter, start_worker, tmp_path
    )
    assert exporter.scrape().value("celery_worker_tasks_reserved", hostname=worker.hostname) == 1
    first = age(exporter, queue, "active")
    assert first is not None
    assert age(exporter, queue, "waiting") is not None
    # No event arrives while it runs; the age still grows, scrape after scrape.
    wait_for(lambda: (age(exporter, queue, "active") or 0) >= first + 1.5, 20, "the age grows")
    assert (
        exporter.scrape().value("celery_task_last_succeeded_timestamp_seconds", name=TASK) is None
    )

    released_at = time.time()
    release.touch()
    wait_for(lambda: gauges(exporter, queue) == (0, 0), 30, "both tasks finished")
    scrape = exporter.scrape()
    assert (
        scrape.value("celery_task_oldest_active_age_seconds", name=TASK, queue_name=queue) is None
    )
    assert (
        scrape.value("celery_task_oldest_waiting_age_seconds", name=TASK, queue_name=queue) is None
    )
    assert scrape.value("celery_worker_tasks_reserved", hostname=worker.hostname) == 0
    assert scrape.value("celery_task_succeeded_total", name=TASK, queue_name=queue) == 2
    succeeded_at = scrape.value("celery_task_last_succeeded_timestamp_seconds", name=TASK)
    assert succeeded_at is not None
    assert released_at - 1 <= succeeded_at <= time.time()
    assert scrape.value("celery_task_worker_lost_total", name=TASK, queue_name=queue) == 0


def test_a_killed_workers_tasks_stop_running_and_are_counted_lost(
    broker_url, queue, start_exporter, start_worker, tmp_path
) -> None:
    exporter, worker, _ = start_blocked(broker_url, queue, start_exporter, start_worker, tmp_path)
    worker.signal(signal.SIGKILL)  # its whole process group: no worker-offline
    # Lost after the test exporter's 3 s worker timeout: nothing runs or waits there any more.
    wait_for(lambda: gauges(exporter, queue) == (0, 0), 30, "the lost worker's tasks gone")
    scrape = exporter.scrape()
    assert scrape.value("celery_worker_lost", hostname=worker.hostname) == 1
    assert scrape.value("celery_task_worker_lost_total", name=TASK, queue_name=queue) == 2
