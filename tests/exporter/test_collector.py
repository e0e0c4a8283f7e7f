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
        get("celery_task_runtime_seconds_bucket", {**task, "outcome": "succeeded", "le": "1.0"})
        == 1
    )
    assert (
        get("celery_task_runtime_seconds_bucket", {**task, "outcome": "succeeded", "le": "+Inf"})
        == 1
    )
    assert get("celery_task_runtime_seconds_sum", {**task, "outcome": "failed"}) == 1.0
    assert get("celery_task_queue_wait_seconds_count", task) == 2
    assert get("celery_task_queue_wait_seconds_sum", task) == 1.5
    # Each histogram has its own layout: waits of 0.5 s and 1 s.
    queue_wait = {**task, "le": "0.1"}
    assert get("celery_task_queue_wait_seconds_bucket", queue_wait) == 0
    assert get("celery_task_queue_wait_seconds_bucket", {**task, "le": "1.0"}) == 2
    assert get("celery_task_queue_wait_seconds_bucket", {**task, "le": "300.0"}) == 2
    assert get("celery_task_queue_wait_seconds_bucket", {**task, "le": "0.25"}) is None
    assert get("celery_task_latency_seconds_bucket", {**task, "le": "0.5"}) == 0
    assert get("celery_task_latency_seconds_bucket", {**task, "le": "2.5"}) == 2
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
        # The text format has no info type: an info metric is a gauge under its full name.
        family = families[spec.name if spec.type == "info" else spec.family]
        assert (family.type, family.documentation) == (spec.text_type, spec.help), spec.name


def test_catalogue_names_follow_prometheus_conventions() -> None:
    for spec in m.CATALOGUE:
        assert spec.name.startswith("celery_")
        assert (spec.type == "counter") == spec.name.endswith("_total"), spec.name
        if spec.type == "histogram":
            assert spec.name.endswith("_seconds"), spec.name
    assert len(m.BY_NAME) == len(m.CATALOGUE)
    assert m.RUNTIME_BUCKETS[-1] >= 3600, "runtimes reach hours"
    assert m.LATENCY_BUCKETS[-1] >= 3600
    # The alert thresholds are bucket bounds: histogram_quantile is exact there.
    assert 300.0 in m.QUEUE_WAIT_BUCKETS  # CeleryQueueWaitHigh


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


# -- OpenMetrics, exemplars, and what runs now ----------------------------------------------------


def openmetrics_families(exposition: Exposition) -> dict:
    """Parsed by prometheus_client's OpenMetrics parser, which is strict: a malformed line, a
    missing `# EOF`, a bad exemplar or a sample of the wrong family is an error."""
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    text = exposition.render(openmetrics=True).decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


@pytest.fixture
def exposition(parts) -> Exposition:
    tracker, lengths, _ = parts
    return Exposition(tracker, threading.Lock(), BrokerStatus(), lengths, "1.2.3")


def lifecycle(uuid: str, runtime: float, end: float) -> list[dict]:
    return [
        sent(uuid, ts=end - runtime - 1),
        received(uuid, ts=end - runtime - 1),
        ev("task-started", uuid, end - runtime),
        ev("task-succeeded", uuid, end, runtime=runtime),
    ]


def test_openmetrics_has_every_family_with_its_type_and_help(parts, exposition) -> None:
    tracker, _, _ = parts
    tracker.handle_all([*lifecycle("t1", 0.3, 990.0), heartbeat_event()])
    families = openmetrics_families(exposition)
    for spec in m.CATALOGUE:
        family = families[spec.family]
        assert (family.type, family.documentation) == (spec.type, spec.help), spec.name


def heartbeat_event(**fields: object) -> dict:
    return {
        "type": "worker-heartbeat",
        "hostname": "w@h",
        "loadavg": [1.5, 0.75, 0.25],
        "sw_ident": "py-celery",
        "sw_ver": "5.5.3",
        "sw_sys": "Linux",
        **fields,
    }


def test_histogram_buckets_carry_their_latest_task_id_as_exemplar(parts, exposition) -> None:
    tracker, _, _ = parts
    tracker.handle_all(
        [
            *lifecycle("fast", 0.3, 990.0),
            *lifecycle("faster", 0.4, 991.5),
            *lifecycle("slow", 20.0, 995.0),
        ]
    )
    families = openmetrics_families(exposition)
    exemplars = {
        (sample.labels["outcome"], sample.labels["le"]): (
            sample.exemplar.labels,
            sample.exemplar.value,
            float(sample.exemplar.timestamp),
        )
        for sample in families["celery_task_runtime_seconds"].samples
        if sample.exemplar is not None
    }
    assert exemplars == {
        ("succeeded", "1.0"): ({"task_id": "faster"}, 0.4, 991.5),
        ("succeeded", "30.0"): ({"task_id": "slow"}, 20.0, 995.0),
    }
    waits = [
        s.exemplar.labels["task_id"]
        for s in families["celery_task_queue_wait_seconds"].samples
        if s.exemplar is not None
    ]
    assert waits == ["slow"]  # all three waited 1 s: the latest is the bucket's exemplar
    # The text format stays as it was: no exemplars, no # EOF.
    text = exposition.render().decode()
    assert " # {" not in text
    assert "# EOF" not in text
    assert exposition.render(openmetrics=True).decode().endswith("\n# EOF\n")


@pytest.mark.parametrize(
    ("task_id", "exemplar"),
    [
        ("id with spaces, ünïcödé and {braces}", True),
        ('id with "quotes"', False),
        ("id with a \\ backslash", False),
        ("id with a\nnewline", False),
        ("lone \ud800 surrogate", True),
    ],
)
def test_odd_task_ids_never_break_the_exposition(parts, exposition, task_id, exemplar) -> None:
    tracker, _, _ = parts
    tracker.handle_all(lifecycle(task_id, 0.3, 990.0))
    families = openmetrics_families(exposition)
    ids = [
        s.exemplar.labels["task_id"]
        for s in families["celery_task_runtime_seconds"].samples
        if s.exemplar is not None
    ]
    assert len(ids) == int(exemplar)


def test_running_and_waiting_series_fall_to_zero_and_ages_disappear(parts, clock) -> None:
    tracker, _, registry = parts
    get = registry.get_sample_value
    task = {"name": "app.add", "queue_name": "q1"}
    tracker.handle_all(
        [
            sent("a", ts=990.0),
            received("a", ts=990.0),
            ev("task-started", "a", 995.0),
            sent("b", ts=998.0),
            received("b", ts=998.0),
        ]
    )
    assert get("celery_task_active", task) == 1
    assert get("celery_task_oldest_active_age_seconds", task) == 5.0
    assert get("celery_task_waiting", task) == 1
    assert get("celery_task_oldest_waiting_age_seconds", task) == 2.0
    assert get("celery_worker_tasks_reserved", {"hostname": "w@h"}) is None  # no worker event yet
    tracker.handle(heartbeat_event())
    assert get("celery_worker_tasks_reserved", {"hostname": "w@h"}) == 1
    clock.advance(10)
    assert get("celery_task_oldest_active_age_seconds", task) == 15.0
    tracker.handle_all(
        [
            ev("task-succeeded", "a", 1_010.0, runtime=15.0),
            ev("task-started", "b", 1_010.0),
            ev("task-succeeded", "b", 1_010.0, runtime=0.1),
        ]
    )
    assert get("celery_task_active", task) == 0
    assert get("celery_task_waiting", task) == 0
    assert get("celery_task_oldest_active_age_seconds", task) is None
    assert get("celery_task_oldest_waiting_age_seconds", task) is None
    assert get("celery_task_last_succeeded_timestamp_seconds", {"name": "app.add"}) == 1_010.0
    assert get("celery_task_last_sent_timestamp_seconds", {"name": "app.add"}) == 998.0


def test_a_worker_clock_ahead_makes_an_age_of_zero_not_negative(parts) -> None:
    tracker, _, registry = parts
    tracker.handle_all([sent(ts=1_000.0), received(ts=1_004.0), ev("task-started", ts=1_005.0)])
    task = {"name": "app.add", "queue_name": "q1"}
    assert registry.get_sample_value("celery_task_oldest_active_age_seconds", task) == 0.0


def test_worker_facts_are_served_while_it_is_up(parts, clock) -> None:
    tracker, _, registry = parts
    get = registry.get_sample_value
    tracker.handle(heartbeat_event())
    info = {"hostname": "w@h", "sw_ident": "py-celery", "sw_ver": "5.5.3", "sw_sys": "Linux"}
    assert get("celery_worker_info", info) == 1
    loads = [
        get("celery_worker_load_average", {"hostname": "w@h", "window": w})
        for w in ("1m", "5m", "15m")
    ]
    assert loads == [1.5, 0.75, 0.25]
    clock.advance(11)  # lost: its load is unknown, what it runs still known
    assert get("celery_worker_load_average", {"hostname": "w@h", "window": "1m"}) is None
    assert get("celery_worker_info", info) == 1


def test_tasks_too_quick_to_be_seen_running_still_have_their_series_at_zero(parts) -> None:
    tracker, _, registry = parts
    tracker.handle_all(lifecycle("t1", 0.01, 990.0))  # ran and ended between two scrapes
    task = {"name": "app.add", "queue_name": "q1"}
    for metric in ("celery_task_active", "celery_task_waiting", "celery_task_worker_lost_total"):
        assert registry.get_sample_value(metric, task) == 0, metric
    assert registry.get_sample_value("celery_task_oldest_active_age_seconds", task) is None


def test_liveness_holds_through_an_outage_and_fails_only_a_stuck_loop() -> None:
    status = BrokerStatus(broker="redis://h:6379//", connected=False, last_poll=100.0)
    status.disconnected_at = 40.0
    assert status.health(now=130.0) == (False, "not connected to redis://h:6379// for 90s")
    assert status.liveness(now=130.0) == (True, "ok: alive, reconnecting to the broker")
    status.connected = True
    assert status.liveness(now=130.0) == (True, "ok: alive, consuming events")
    assert status.liveness(now=160.0) == (True, "ok: alive, consuming events")  # 60 s: still
    assert status.liveness(now=161.0) == (False, "consumer stuck: no turn of its loop for 61s")
