"""The collector renders tracker state into a fresh registry: exact samples, no zero-filling."""

from __future__ import annotations

import shutil
import subprocess
import threading

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from celery_obs.exporter import metrics as m
from celery_obs.exporter.collector import CeleryCollector, Exposition
from celery_obs.exporter.config import Limits
from celery_obs.exporter.consumer import BrokerStatus
from celery_obs.exporter.queues import QueueLengths
from celery_obs.exporter.tracker import Tracker

from test_tracker import Clock, ev, received, sent


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def parts(clock: Clock):
    tracker = Tracker(Limits(worker_timeout=10, worker_retention=60), clock=clock)
    status = BrokerStatus(broker="redis://h:6379//", connected=True, reconnects=2)
    lengths = QueueLengths()
    registry = CollectorRegistry()
    registry.register(
        CeleryCollector(Exposition(tracker, threading.Lock(), status, lengths, "1.2.3"))
    )
    return tracker, lengths, registry


def test_samples_match_the_tracker(parts) -> None:
    tracker, lengths, registry = parts
    tracker.handle_all(
        [
            sent(ts=10.0),
            received(ts=10.0),
            ev("task-started", ts=10.5),
            ev("task-succeeded", ts=11.0, runtime=0.4),
            sent(uuid="t2", ts=10.0),
            received(uuid="t2", ts=10.0),
            ev("task-started", "t2", 11.0),
            ev("task-failed", "t2", 12.0, exception="ValueError('x')"),
            {"type": "worker-heartbeat", "hostname": "w@h", "active": 2, "processed": 5},
        ]
    )
    lengths.update({"q1": 7})
    get = registry.get_sample_value
    task = {"name": "app.add", "queue_name": "q1"}
    assert get("celery_task_sent_total", task) == 2
    assert get("celery_task_succeeded_total", task) == 1
    assert get("celery_task_failed_total", {**task, "exception": "ValueError"}) == 1
    assert (
        get("celery_task_runtime_seconds_bucket", {**task, "outcome": "succeeded", "le": "0.25"})
        == 0
    )
    assert (
        get("celery_task_runtime_seconds_bucket", {**task, "outcome": "succeeded", "le": "0.5"})
        == 1
    )
    assert (
        get("celery_task_runtime_seconds_bucket", {**task, "outcome": "succeeded", "le": "+Inf"})
        == 1
    )
    assert get("celery_task_runtime_seconds_sum", {**task, "outcome": "failed"}) == 1.0
    assert get("celery_task_queue_wait_seconds_count", task) == 2
    assert get("celery_task_queue_wait_seconds_sum", task) == 1.5
    assert get("celery_task_latency_seconds_sum", task) == 3.0
    assert get("celery_worker_up", {"hostname": "w@h"}) == 1
    assert get("celery_worker_tasks_active", {"hostname": "w@h"}) == 2
    assert get("celery_worker_tasks_processed_total", {"hostname": "w@h"}) == 5
    assert get("celery_worker_last_heartbeat_timestamp_seconds", {"hostname": "w@h"}) == 1000.0
    assert get("celery_queue_length", {"queue_name": "q1"}) == 7
    assert get("celery_exporter_broker_connected") == 1
    assert get("celery_exporter_broker_reconnects_total") == 2
    assert get("celery_exporter_events_total", {"type": "task-sent"}) == 2
    assert get("celery_exporter_tasks_tracked") == 0
    assert get("celery_exporter_build_info", {"version": "1.2.3"}) == 1


def test_no_zero_filled_label_sets(parts) -> None:
    tracker, _, registry = parts
    tracker.handle_all([sent(), received(), ev("task-started"), ev("task-succeeded", runtime=1)])
    text = generate_latest(registry).decode()
    assert "celery_task_failed_total{" not in text
    assert "celery_task_retried_total{" not in text
    # The families are still described, so dashboards find HELP/TYPE before the first failure.
    assert "# TYPE celery_task_failed_total counter" in text


def test_down_worker_stays_at_zero_then_is_dropped(parts, clock: Clock) -> None:
    tracker, _, registry = parts
    tracker.handle({"type": "worker-heartbeat", "hostname": "w@h", "active": 1})
    clock.advance(11)
    assert registry.get_sample_value("celery_worker_up", {"hostname": "w@h"}) == 0
    clock.advance(59)  # down since t+10 -> 60 s of the 60 s retention
    assert registry.get_sample_value("celery_worker_up", {"hostname": "w@h"}) == 0
    clock.advance(1)
    assert registry.get_sample_value("celery_worker_up", {"hostname": "w@h"}) is None


def test_dropped_workers_leave_no_cached_series(parts, clock: Clock) -> None:
    tracker, lengths, _ = parts
    exposition = Exposition(tracker, threading.Lock(), BrokerStatus(), lengths, "x")
    for i in range(50):  # pods come and go
        tracker.handle({"type": "worker-heartbeat", "hostname": f"pod-{i}@h"})
        exposition.render()
        clock.advance(100)  # past the 10 s timeout and 60 s retention
    exposition.render()
    assert all(
        len(exposition._prefixes.get(spec.name, {})) <= 1
        for spec in (m.WORKER_UP, m.WORKER_TASKS_ACTIVE, m.WORKER_LAST_HEARTBEAT)
    )


def test_every_catalogue_metric_is_exposed_with_its_type_and_help(parts) -> None:
    _, _, registry = parts
    families = {family.name: family for family in registry.collect()}
    for spec in m.CATALOGUE:
        family = families[spec.family]
        assert (family.type, family.documentation) == (spec.type, spec.help), spec.name


def test_catalogue_names_follow_prometheus_conventions() -> None:
    for spec in m.CATALOGUE:
        assert spec.name.startswith("celery_")
        assert (spec.type == "counter") == spec.name.endswith("_total"), spec.name
        if spec.type == "histogram":
            assert spec.name.endswith("_seconds"), spec.name
    assert len(m.BY_NAME) == len(m.CATALOGUE)
    assert m.DEFAULT_BUCKETS[-1] >= 3600, "buckets must reach hours"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_accepts_the_exposition(parts) -> None:
    tracker, lengths, registry = parts
    tracker.handle_all(
        [
            sent(),
            received(),
            ev("task-started"),
            ev("task-succeeded", runtime=1),
            {"type": "worker-heartbeat", "hostname": "w@h"},
        ]
    )
    lengths.update({"q1": 0})
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=generate_latest(registry), capture_output=True
    )
    assert result.returncode == 0, result.stderr.decode() + result.stdout.decode()


def test_a_string_no_encoding_can_carry_costs_only_its_event(parts) -> None:
    tracker, _, registry = parts
    exposition = Exposition(tracker, threading.Lock(), BrokerStatus(), QueueLengths(), "x")
    surrogate = "bad\ud800name"  # what json.loads makes of "bad\\ud800name"
    tracker.handle_all(
        [
            sent(uuid="s1", name=surrogate, queue="q\udfff"),
            {"type": "worker-heartbeat", "hostname": "w\ud800@h", "active": 1},
            sent(uuid="s2"),  # the batch's other events still count
        ]
    )
    text = exposition.render().decode("utf-8")  # valid UTF-8, every later scrape too
    assert 'celery_task_sent_total{name="bad?name",queue_name="q?"} 1' in text
    assert 'celery_worker_up{hostname="w?@h"} 1' in text
    assert (
        registry.get_sample_value("celery_task_sent_total", {"name": "app.add", "queue_name": "q1"})
        == 1
    )


def test_label_values_are_cut_at_256_characters_and_counted(parts) -> None:
    tracker, _, registry = parts
    long_name, long_host = "n" * 100_000, "h" * 5_000
    for i in range(3):
        tracker.handle(sent(uuid=f"l{i}", name=long_name))
    tracker.handle({"type": "worker-heartbeat", "hostname": long_host})
    get = registry.get_sample_value
    assert get("celery_task_sent_total", {"name": "n" * 256, "queue_name": "q1"}) == 3
    assert get("celery_worker_up", {"hostname": "h" * 256}) == 1
    assert get("celery_exporter_label_truncated_total", {"label": "name"}) == 3
    assert get("celery_exporter_label_truncated_total", {"label": "hostname"}) == 1


def test_counts_no_heartbeat_could_mean_are_not_believed(parts) -> None:
    tracker, _, registry = parts
    tracker.handle({"type": "worker-heartbeat", "hostname": "w@h", "active": 3, "processed": 9})
    tracker.handle({"type": "worker-heartbeat", "hostname": "w@h", "active": 10**400})
    tracker.handle({"type": "worker-heartbeat", "hostname": "w@h", "processed": -5})
    assert registry.get_sample_value("celery_worker_tasks_active", {"hostname": "w@h"}) == 3
    assert (
        registry.get_sample_value("celery_worker_tasks_processed_total", {"hostname": "w@h"}) == 9
    )
