"""Real layer: a real prefork `celery worker` on the machine's Redis and RabbitMQ, a real producer
with task-sent events, the exporter as a subprocess, scraped over HTTP. Exact counts."""

from __future__ import annotations

import json
import signal

import pytest
import redis
from kombu import Connection, Exchange, Producer

from brokers import RabbitVhost
from support import ExporterProcess, Scrape, producer, send_many, wait_for

pytestmark = pytest.mark.broker

TASK_LABELS = ("name", "queue_name")


def settled(exporter: ExporterProcess, expected: dict[str, dict], timeout: float = 60.0) -> Scrape:
    """Poll until every expected series matches, then return that scrape (or fail with a diff)."""
    last: list[Scrape] = []

    def matches() -> bool:
        scrape = exporter.scrape()
        last[:] = [scrape]
        return all(
            scrape.series(metric, *labels) == want for metric, (labels, want) in expected.items()
        )

    try:
        wait_for(matches, timeout, "expected task counters")
    except AssertionError:
        scrape = last[0]
        for metric, (labels, want) in expected.items():
            assert scrape.series(metric, *labels) == want, metric
        raise
    return last[0]


def test_every_task_lifecycle_is_counted_exactly(broker_url, queue, start_exporter, start_worker):
    exporter = start_exporter(broker_url)
    worker = start_worker(broker_url, queue)
    exporter.wait_value("celery_worker_up", 1, hostname=worker.hostname)

    app = producer(broker_url, queue)
    send_many(
        app,
        [
            ("obs.add", (1, 2), {}),
            ("obs.add", (3, 4), {}),
            ("obs.add", (5, 6), {}),
            ("obs.fail_value", (), {}),
            ("obs.fail_value", (), {}),
            ("obs.fail_payment", (), {}),
            ("obs.retry_once", (), {}),
            ("obs.sleep", (30,), {}),  # killed by its 1 s hard time limit
            ("obs.reject", (), {}),
            ("obs.no_such_task", (), {}),  # no worker knows it
        ],
    )
    # A task with a countdown, revoked once the worker holds it, before it runs.
    [eta_task] = send_many(app, [("obs.add", (7, 8), {"countdown": 3})])
    exporter.wait_value("celery_task_received_total", 4, name="obs.add", queue_name=queue)
    app.control.revoke(eta_task)

    q = queue
    scrape = settled(
        exporter,
        {
            "celery_task_sent_total": (
                TASK_LABELS,
                {
                    ("obs.add", q): 4,
                    ("obs.fail_value", q): 2,
                    ("obs.fail_payment", q): 1,
                    ("obs.retry_once", q): 2,
                    ("obs.sleep", q): 1,
                    ("obs.reject", q): 1,
                    ("obs.no_such_task", q): 1,
                },
            ),
            "celery_task_received_total": (
                TASK_LABELS,
                {
                    ("obs.add", q): 4,
                    ("obs.fail_value", q): 2,
                    ("obs.fail_payment", q): 1,
                    ("obs.retry_once", q): 2,
                    ("obs.sleep", q): 1,
                    ("obs.reject", q): 1,
                },
            ),
            "celery_task_started_total": (
                TASK_LABELS,
                {
                    ("obs.add", q): 3,
                    ("obs.fail_value", q): 2,
                    ("obs.fail_payment", q): 1,
                    ("obs.retry_once", q): 2,
                    ("obs.sleep", q): 1,
                    ("obs.reject", q): 1,
                },
            ),
            "celery_task_succeeded_total": (
                TASK_LABELS,
                {("obs.add", q): 3, ("obs.retry_once", q): 1},
            ),
            "celery_task_failed_total": (
                (*TASK_LABELS, "exception"),
                {
                    ("obs.fail_value", q, "ValueError"): 2,
                    ("obs.fail_payment", q, "PaymentDeclined"): 1,
                    # A hard time limit: Celery sends task-failed twice (on_timeout, then
                    # on_failure). Its own Receiver counts both, and so do we.
                    ("obs.sleep", q, "TimeLimitExceeded"): 2,
                    # Celery >= 5.5 reports a Reject without requeue as a failure *and* a rejection.
                    ("obs.reject", q, "Reject"): 1,
                    ("obs.no_such_task", q, "NotRegistered"): 1,
                },
            ),
            "celery_task_retried_total": (TASK_LABELS, {("obs.retry_once", q): 1}),
            "celery_task_revoked_total": (TASK_LABELS, {("obs.add", q): 1}),
            "celery_task_rejected_total": (TASK_LABELS, {("obs.reject", q): 1}),
            "celery_task_runtime_seconds_count": (
                (*TASK_LABELS, "outcome"),
                {
                    ("obs.add", q, "succeeded"): 3,
                    ("obs.retry_once", q, "succeeded"): 1,
                    ("obs.fail_value", q, "failed"): 2,
                    ("obs.fail_payment", q, "failed"): 1,
                    ("obs.sleep", q, "failed"): 1,
                    ("obs.reject", q, "failed"): 1,
                },
            ),
            "celery_task_queue_wait_seconds_count": (
                TASK_LABELS,
                {
                    ("obs.add", q): 3,
                    ("obs.fail_value", q): 2,
                    ("obs.fail_payment", q): 1,
                    ("obs.retry_once", q): 2,
                    ("obs.sleep", q): 1,
                    ("obs.reject", q): 1,
                },
            ),
            "celery_task_latency_seconds_count": (
                TASK_LABELS,
                {
                    ("obs.add", q): 3,
                    ("obs.fail_value", q): 2,
                    ("obs.fail_payment", q): 1,
                    ("obs.retry_once", q): 1,
                    ("obs.sleep", q): 1,
                    ("obs.reject", q): 1,
                    ("obs.no_such_task", q): 1,
                },
            ),
        },
    )

    # The hard time limit killed obs.sleep at 1 s: its runtime is about that, not 30 s.
    assert (
        0.9
        <= scrape.value(
            "celery_task_runtime_seconds_sum", name="obs.sleep", queue_name=q, outcome="failed"
        )
        < 5
    )
    assert scrape.value("celery_worker_up", hostname=worker.hostname) == 1
    assert scrape.value("celery_exporter_broker_connected") == 1
    assert scrape.value("celery_exporter_malformed_events_total", reason="decode") is None
    assert scrape.value("celery_exporter_tasks_tracked") == 0
    assert scrape.value("celery_exporter_last_event_timestamp_seconds") > 0


def test_sigkilled_worker_goes_down_within_the_timeout(
    broker_url, queue, start_exporter, start_worker
):
    exporter = start_exporter(broker_url, "--worker-timeout", "3")
    worker = start_worker(broker_url, queue)
    exporter.wait_value("celery_worker_up", 1, hostname=worker.hostname)
    worker.signal(signal.SIGKILL)
    # No worker-offline is sent: only the missing heartbeats can tell. 3 s timeout + slack.
    exporter.wait_value("celery_worker_up", 0, timeout=8, hostname=worker.hostname)
    scrape = exporter.scrape()
    assert scrape.value("celery_worker_tasks_active", hostname=worker.hostname) == 0
    assert (
        scrape.value("celery_worker_last_heartbeat_timestamp_seconds", hostname=worker.hostname) > 0
    )


def test_warm_shutdown_is_down_at_once(redis_url, queue, start_exporter, start_worker):
    # A timeout far longer than the test: only the worker-offline event can flip it.
    exporter = start_exporter(redis_url, "--worker-timeout", "600")
    worker = start_worker(redis_url, queue)
    exporter.wait_value("celery_worker_up", 1, hostname=worker.hostname)
    worker.signal(signal.SIGTERM)
    assert worker.wait(20) == 0
    exporter.wait_value("celery_worker_up", 0, timeout=5, hostname=worker.hostname)


def test_redis_queue_length_sums_priority_sub_queues(redis_url, queue, start_exporter):
    exporter = start_exporter(redis_url)
    app = producer(redis_url, queue)
    for priority in (0, 0, 3, 6, 9, 9, 9):
        app.send_task("obs.add", (1, 1), priority=priority)
    keys = redis.Redis.from_url(redis_url).keys(f"{queue}*")
    assert len(keys) == 4, keys  # the plain list plus three priority sub-lists
    # Discovered from the task-sent events alone: no --queues flag.
    exporter.wait_value("celery_queue_length", 7, queue_name=queue)


def test_redis_queue_length_finds_the_clusters_own_priority_steps(redis_url, queue, start_exporter):
    # The cluster uses ten priority steps; the exporter is not told: all ten lists count.
    exporter = start_exporter(redis_url)
    app = producer(redis_url, queue)
    app.conf.broker_transport_options = {"priority_steps": list(range(10))}
    for priority in range(10):
        app.send_task("obs.add", (1, 1), priority=priority)
    assert len(redis.Redis.from_url(redis_url).keys(f"{queue}*")) == 10
    exporter.wait_value("celery_queue_length", 10, queue_name=queue)


def test_redis_queue_length_with_a_global_key_prefix_and_a_key_that_is_no_queue(
    redis_url, queue, start_exporter
):
    prefix = "tenant-a:"
    client = redis.Redis.from_url(redis_url)
    client.set(f"{prefix}not_a_list", "a string, not a queue")  # WRONGTYPE for LLEN
    exporter = start_exporter(
        redis_url,
        "--broker-transport-option",
        f"global_keyprefix={prefix}",
        "--queues",
        f"{queue},not_a_list",
    )
    app = producer(redis_url, queue)
    app.conf.broker_transport_options = {"global_keyprefix": prefix}
    for priority in (0, 5, 9):
        app.send_task("obs.add", (1, 1), priority=priority)
    assert all(key.startswith(prefix.encode()) for key in client.keys(f"*{queue}*"))
    exporter.wait_value("celery_queue_length", 3, queue_name=queue)
    # The key that is not a list fails alone, counted; the real queue's length is right.
    wait_for(
        lambda: exporter.scrape().value("celery_exporter_queue_probe_errors_total"),
        10,
        "a counted probe error",
    )
    assert exporter.scrape().value("celery_queue_length", queue_name="not_a_list") is None


def test_amqp_queue_length_from_passive_declare(amqp_url, queue, start_exporter):
    exporter = start_exporter(amqp_url, "--queues", f"{queue},obs_missing")
    app = producer(amqp_url, queue)
    for _ in range(5):
        app.send_task("obs.add", (1, 1))
    exporter.wait_value("celery_queue_length", 5, queue_name=queue)
    assert exporter.scrape().value("celery_queue_length", queue_name="obs_missing") == 0
    assert exporter.scrape().value("celery_exporter_queue_probe_errors_total") == 0


def test_garbage_on_the_event_exchange_is_counted_and_skipped(broker_url, start_exporter):
    exporter = start_exporter(broker_url)
    with Connection(broker_url) as connection:
        from celery.events.event import get_exchange

        exchange: Exchange = get_exchange(connection)
        publish = Producer(connection.channel(), exchange=exchange).publish
        publish(
            b"{definitely not json",
            routing_key="task.started",
            content_type="application/json",
            content_encoding="utf-8",
        )
        publish(
            b"\x80\x04K\x01.",
            routing_key="task.started",
            content_type="application/x-python-serialize",
            content_encoding="binary",
        )
        publish(
            json.dumps([42, {"type": "worker-heartbeat", "hostname": "fake@h"}]),
            routing_key="worker.multi",
            content_type="application/json",
            content_encoding="utf-8",
        )
    exporter.wait_value("celery_worker_up", 1, hostname="fake@h")
    scrape = exporter.scrape()
    assert scrape.series("celery_exporter_malformed_events_total", "reason") == {
        ("decode",): 1,
        ("content_type",): 1,
        ("not_an_event",): 1,
    }
    assert scrape.value("celery_exporter_events_total", type="worker-heartbeat") == 1
    assert exporter.healthz()[0] == 200


def test_enable_events_makes_a_worker_without_dash_e_report(
    broker_url, queue, start_exporter, start_worker
):
    # Both brokers: on Redis the broadcast goes over the exporter's own link, elsewhere through
    # kombu's Producer (control.py).
    redis_url = broker_url
    worker = start_worker(redis_url, queue, events=False)
    app = producer(redis_url, queue)
    # First prove the worker sends no task events of its own: it ran a task (its heartbeat
    # says so) and an exporter that does not broadcast saw none.
    silent = start_exporter(redis_url, "--no-enable-events")
    app.send_task("obs.add", (1, 1))
    wait_for(
        lambda: (
            silent.scrape().value("celery_worker_tasks_processed_total", hostname=worker.hostname)
            == 1
        ),
        30,
        "the worker's heartbeat counting the task",
    )
    assert (
        silent.scrape().value("celery_task_received_total", name="obs.add", queue_name=queue)
        is None
    )
    exporter = start_exporter(redis_url, "--enable-events-interval", "1")

    def succeeded() -> float | None:
        app.send_task("obs.add", (1, 1))
        return exporter.scrape().value(
            "celery_task_succeeded_total", name="obs.add", queue_name=queue
        )

    wait_for(succeeded, 30, "task events from a worker started without -E", interval=0.5)


def test_a_worker_started_later_without_dash_e_reports_at_once(
    redis_url, queue, start_exporter, start_worker
):
    # The periodic broadcast is 5 minutes away: a worker that comes online must not wait for
    # it (a deploy or a scale-up would lose its first tasks' events).
    exporter = start_exporter(redis_url, "--enable-events-interval", "300")
    worker = start_worker(redis_url, queue, events=False)
    wait_for(
        lambda: exporter.scrape().value("celery_worker_up", hostname=worker.hostname) == 1,
        30,
        "the worker online",
    )
    app = producer(redis_url, queue)

    def succeeded() -> float | None:
        app.send_task("obs.add", (1, 1))
        return exporter.scrape().value(
            "celery_task_succeeded_total", name="obs.add", queue_name=queue
        )

    wait_for(succeeded, 30, "task events from a worker that came online after the exporter")


def test_the_broker_password_never_shows(rabbit: RabbitVhost, start_exporter):
    user, password, vhost = rabbit.user, rabbit.password, rabbit.name
    good = rabbit.url()
    exporter = start_exporter(good, "--log-level", "debug")
    status, reason = exporter.healthz()
    assert (status, reason) == (
        200,
        f"ok: connected to amqp://{user}:**@127.0.0.1:5672/{vhost}, consuming events\n",
    )

    bad = rabbit.url(password=f"wrong-{password}")
    refused = start_exporter(bad, healthy=False)

    def refusal() -> str | None:
        status, reason = refused.healthz()
        return reason if status == 503 and "ACCESS_REFUSED" in reason else None

    reason = wait_for(refusal, 20, "503 naming the refusal")
    assert f"amqp://{user}:**@127.0.0.1:5672/" in reason
    wait_for(lambda: "cannot connect to the broker" in refused.output(), 10, "a log line")
    for process in (exporter, refused):
        process.signal(signal.SIGTERM)
        assert process.wait(10) == 0  # SIGTERM is a clean stop
        assert password not in process.output()
