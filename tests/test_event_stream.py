"""Thousands of synthetic events, single and batched, through the real brokers: exact counts.

The traffic comes from the benchmark's generator (bench/eventgen.py), which publishes to the
event exchange exactly as Celery's dispatcher does, at full speed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from support import ExporterProcess, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import eventgen  # lives in bench/, which is not a package

pytestmark = pytest.mark.broker

PROBE = "probe@stream-test"


def wait_subscribed(exporter: ExporterProcess, url: str) -> None:
    """Publish probe heartbeats until one is counted: the subscription is live."""
    probe = eventgen.Workload(tasks=0)
    probe.events = [
        {
            "type": "worker-heartbeat",
            "hostname": PROBE,
            "timestamp": time.time(),
            "utcoffset": 0,
            "freq": 2.0,
            "active": 0,
            "processed": 0,
        }
    ]
    publisher = eventgen.publisher_for(url)

    def seen() -> bool:
        publisher.publish(eventgen.encode_for(url, probe))
        return exporter.scrape().value("celery_worker_up", hostname=PROBE) == 1

    wait_for(seen, 30, "the exporter to see a probe heartbeat", interval=0.3)


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
    eventgen.publisher_for(broker_url).publish(eventgen.encode_for(broker_url, workload))
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
    # The generator spreads the tasks evenly over 10 names, each routed to one queue.
    sent = scrape.series("celery_task_sent_total", "name", "queue_name")
    assert len(sent) == 10
    assert all(queue != "unknown" for _, queue in sent)
