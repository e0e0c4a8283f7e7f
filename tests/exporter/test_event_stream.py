"""Thousands of synthetic events, single and batched, through the real brokers: exact counts.

The traffic comes from the benchmark's generator (bench/eventgen.py), which publishes to the
event exchange exactly as Celery's dispatcher does, at full speed.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import pytest
from kombu import Connection

from support import ROOT, ExporterProcess, wait_for

sys.path.insert(0, str(ROOT / "bench"))
import eventgen  # lives in bench/, which is not a package

pytestmark = pytest.mark.broker

PROBE = "probe@stream-test"


def probe_wire(url: str, hostname: str = PROBE) -> list:
    probe = eventgen.Workload(tasks=0)
    probe.events = [
        {
            "type": "worker-heartbeat",
            "hostname": hostname,
            "timestamp": time.time(),
            "utcoffset": 0,
            "freq": 2.0,
            "active": 0,
            "processed": 0,
        }
    ]
    return eventgen.encode_for(url, probe)


def wait_subscribed(exporter: ExporterProcess, url: str) -> None:
    """Publish probe heartbeats until one is counted: the subscription is live."""
    with eventgen.publisher_for(url) as publisher:
        settle(exporter, url, publisher)


def settle(exporter: ExporterProcess, url: str, publisher: eventgen._Closing) -> None:
    def seen() -> bool:
        publisher.publish(probe_wire(url))
        return exporter.scrape().value("celery_worker_up", hostname=PROBE) == 1

    wait_for(seen, 30, "the exporter to see a probe heartbeat", interval=0.3)
    # A probe published just before the one seen may still be in flight, and would be counted
    # after the test's "before" scrape. One last probe, under its own name, settles it: events
    # from one publisher arrive in order, so once it is counted every earlier one is.
    marker = f"marker-{time.monotonic_ns()}@stream-test"
    publisher.publish(probe_wire(url, marker))
    wait_for(
        lambda: exporter.scrape().value("celery_worker_up", hostname=marker) == 1,
        30,
        "the last probe counted",
    )


@pytest.mark.parametrize("batch", [1, 24])
def test_exact_counts_at_full_speed(broker_url, start_exporter, batch):
    exporter = start_exporter(broker_url, "--no-enable-events")
    wait_subscribed(exporter, broker_url)
    before = exporter.scrape().series("celery_exporter_events_total", "type")

    workload = eventgen.build_workload(
        eventgen.Workload(
            tasks=1000,
            workers=5,
            names=10,
            fail=0.1,
            retry=0.05,
            revoke=0.05,
            reject=0.05,
            batch=batch,
            heartbeat_every=100,
        )
    )
    with eventgen.publisher_for(broker_url) as publisher:
        publisher.publish(eventgen.encode_for(broker_url, workload))
    expected = {
        (kind,): count + before.get((kind,), 0) for kind, count in workload.expected.items()
    }
    assert sum(workload.expected.values()) > 4000

    def counted() -> bool:
        got = exporter.scrape().series("celery_exporter_events_total", "type")
        return got == expected

    wait_for(counted, 60, f"{sum(workload.expected.values())} events counted by type")
    scrape = exporter.scrape()
    for kind in (
        "sent",
        "received",
        "started",
        "succeeded",
        "failed",
        "retried",
        "revoked",
        "rejected",
    ):
        series = scrape.samples.get(f"celery_task_{kind}_total", {})
        assert sum(series.values()) == workload.expected[f"task-{kind}"], kind
    assert scrape.samples.get("celery_exporter_malformed_events_total", {}) == {}
    assert scrape.samples.get("celery_exporter_duplicate_events_total", {}) == {}
    assert scrape.value("celery_exporter_broker_reconnects_total") == 0
    assert scrape.value("celery_exporter_tasks_tracked") == 0
    # The fast path, not kombu's drain loop, with whichever kombu is installed.
    fast = "amqp-socket" if broker_url.startswith("amqp") else "redis-socket"
    assert scrape.series("celery_exporter_event_reader_info", "reader") == {(fast,): 1}
    # The generator spreads the tasks evenly over 10 names, each routed to one queue.
    sent = scrape.series("celery_task_sent_total", "name", "queue_name")
    assert len(sent) == 10
    assert all(queue != "unknown" for _, queue in sent)


def test_amqp_queue_deleted_under_the_exporter(amqp_url, rabbit_vhost, start_exporter):
    """The broker cancels our consumer (here: our queue is deleted); we reconnect and go on."""
    name = f"celeryev.celery-obs.test-{uuid.uuid4()}"
    exporter = start_exporter(amqp_url, "--no-enable-events", "--event-queue-name", name)
    wait_subscribed(exporter, amqp_url)
    with Connection(amqp_url) as connection:
        channel = connection.channel()
        assert name in list_queues(rabbit_vhost)
        channel.queue_delete(name)
    exporter.wait_value("celery_exporter_broker_reconnects_total", 1)
    exporter.wait_healthy()

    def heartbeats() -> float:
        return exporter.scrape().value("celery_exporter_events_total", type="worker-heartbeat")

    before = heartbeats()
    with eventgen.publisher_for(amqp_url) as publisher:

        def counted_again() -> bool:
            publisher.publish(probe_wire(amqp_url))
            return heartbeats() > before

        wait_for(counted_again, 30, "events counted after the reconnect", interval=0.3)


def list_queues(vhost: str) -> list[str]:
    result = subprocess.run(
        ["rabbitmqctl", "list_queues", "-q", "-p", vhost or "/", "name"],
        capture_output=True,
        text=True,
        check=True,
    )
    return [line.strip() for line in result.stdout.splitlines()[1:] if line.strip()]
