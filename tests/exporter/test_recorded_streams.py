"""Real event streams, recorded from real workers (tests/record_streams.py), replayed through the
decoder and the tracker: every event of the stream is counted, exactly, under its task's name.

The reference is what Celery's own receiver sees: each message of the stream, one event per
entry, a task's name taken from the last of its events that carried one. The `retries` streams
are the shapes that lost task-started events before attempts were placed by delivery: autoretry
with backoff, countdown retries, exhausted retries, countdown=0 retries during a burst, and
`countdown=2 ** retries` on a two-process worker, with a prefork and a threads worker at once.
The `redeliveries` streams deliver the same attempt again (Reject(requeue=True), a hard time
limit under acks_late) or send the same id again (Task.replace), and retry to another queue.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from celery_obs.exporter.config import Limits
from celery_obs.exporter.events import EventDecoder
from celery_obs.exporter.metrics import BucketLayout
from celery_obs.exporter.tracker import Tracker, TrackerView

from support import TESTS

STREAMS = TESTS / "streams"
PATHS = sorted(STREAMS.glob("*.jsonl"))


def replay(path: Path) -> tuple[TrackerView, list[dict]]:
    tracker = Tracker(Limits(buckets=LAYOUT))
    decoder = EventDecoder(on_malformed=tracker.count_malformed)
    events: list[dict] = []
    for line in path.read_text().splitlines():
        body = json.loads(line)
        events.extend(body if isinstance(body, list) else [body])
        tracker.handle_all(decoder.decode(line.encode(), "application/json"))
    tracker.tick(tracker.monotonic() + 60)  # past every grace period
    return tracker.view(), events


def reference_counts(events: list[dict]) -> Counter:
    """(name, type) -> events, each named by its task id's name as the stream said so far
    (Task.replace runs another task under the same id: its events are the new name's)."""
    names: dict[str, str] = {}
    counts: Counter = Counter()
    for event in events:
        if event.get("name") and event.get("uuid"):
            names[event["uuid"]] = event["name"]
        if event["type"].startswith("task-") and event["type"] != "task-cancelled":
            counts[(names.get(event.get("uuid"), "unknown"), event["type"])] += 1
    return counts


def exporter_counts(view: TrackerView) -> Counter:
    counted: Counter = Counter()
    for kind, series in view.task_counts.items():
        for labels, value in series.items():
            counted[(labels[0], kind)] += value
    return counted


def by_name(table, name: str) -> tuple[list[int], float]:
    """Bucket counts and sum of one task name's series (one queue per name in these streams)."""
    [(counts, total)] = [(h.counts, h.sum) for key, h in table.items() if key[0] == name]
    return counts, total


#: One layout for all three histograms, with the bounds these checks ask about.
BOUNDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)
LAYOUT = BucketLayout(runtime=BOUNDS, queue_wait=BOUNDS, latency=BOUNDS)


def at_most(counts: list[int], bound: float) -> int:
    """How many observations fell at or below `bound` (one of BOUNDS)."""
    return sum(counts[: BOUNDS.index(bound) + 1])


def test_the_recordings_are_there() -> None:
    assert {p.name for p in PATHS} == {
        f"{workload}-{broker}.jsonl"
        for workload in ("retries", "lifecycles", "redeliveries")
        for broker in ("redis", "amqp")
    }


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_every_event_of_a_real_stream_is_counted_once(path: Path) -> None:
    view, events = replay(path)
    assert exporter_counts(view) == reference_counts(events)
    assert view.duplicates == {}
    assert view.malformed == {}
    assert view.events_by_type == Counter(e["type"] for e in events)


@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_every_attempt_of_real_retries_is_measured_for_what_it_is(broker: str) -> None:
    view, events = replay(STREAMS / f"retries-{broker}.jsonl")
    reference = reference_counts(events)
    assert view.unmeasured == {}
    assert view.negative_durations == {}
    for name in ("obs.autoretry", "obs.retry_countdown", "obs.retry_exhaust", "obs.retry_pow2"):
        # Every attempt's start has its queue wait: none lost, none counted twice.
        waits, _ = by_name(view.queue_wait, name)
        assert sum(waits) == reference[(name, "task-started")], name
        # Runtimes are of no-op attempts: a countdown inside one would take it past 0.5 s.
        outcome = "failed" if name == "obs.retry_exhaust" else "succeeded"
        runtimes, _ = by_name({k: h for k, h in view.runtime.items() if k[2] == outcome}, name)
        assert at_most(runtimes, 0.5) == sum(runtimes) == reference[(name, f"task-{outcome}")]
    # countdown=2 ** retries: 1, 2 and 4 s of countdown between the first send and the success,
    # all inside the latency (the caller waits through them), each attempt's wait outside it.
    waits, _ = by_name(view.queue_wait, "obs.retry_pow2")
    assert at_most(waits, 1.0) == 16
    latencies, total = by_name(view.latency, "obs.retry_pow2")
    assert sum(latencies) == 4
    assert 4 * 7.0 <= total < 4 * 9.0
    # autoretry_for with retry_backoff=1: countdowns of 1 and 2 s.
    latencies, total = by_name(view.latency, "obs.autoretry")
    assert sum(latencies) == 5
    assert 5 * 3.0 <= total < 5 * 5.0


@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_a_hard_time_limit_is_two_failed_events_and_one_measured_failure(broker: str) -> None:
    view, _ = replay(STREAMS / f"lifecycles-{broker}.jsonl")
    [(labels, failed)] = [
        (k, v) for k, v in view.task_counts["task-failed"].items() if k[0] == "obs.sleep"
    ]
    assert (labels[2], failed) == ("TimeLimitExceeded", 2)
    runtimes, total = by_name(view.runtime, "obs.sleep")
    assert sum(runtimes) == 1
    assert 1.0 <= total < 2.0  # killed at its 1 s hard limit
    assert view.unmeasured == {}


def series_by_name(series, name: str) -> dict:
    return {key[1:]: value for key, value in series.items() if key[0] == name}


@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_redelivered_attempts_are_measured_once_each_and_labelled_by_their_queue(
    broker: str,
) -> None:
    view, events = replay(STREAMS / f"redeliveries-{broker}.jsonl")
    assert view.unmeasured == {}
    assert view.negative_durations == {}
    queue = next(e["queue"] for e in events if e.get("name") == "obs.requeue_once")
    prefork = f"{queue}_prefork"
    # Reject(requeue=True), then delivered again: two runs, one outcome, both waits measured.
    assert view.task_counts["task-received"][("obs.requeue_once", queue)] == 4
    assert view.task_counts["task-rejected"][("obs.requeue_once", queue)] == 2
    assert sum(view.queue_wait[("obs.requeue_once", queue)].counts) == 4
    # A hard time limit under acks_late: rejected and failed (1 s), then a run that succeeds.
    runtimes = series_by_name(view.runtime, "obs.time_limit_requeue")
    counts, total = runtimes[(prefork, "failed")].counts, runtimes[(prefork, "failed")].sum
    assert sum(counts) == 2
    assert 2.0 <= total < 3.0
    assert sum(runtimes[(prefork, "succeeded")].counts) == 2
    # Task.replace(): the replacement's run is measured under its own name, from its own send.
    assert view.task_counts["task-succeeded"][("obs.add", queue)] == 2
    assert sum(view.runtime[("obs.add", queue, "succeeded")].counts) == 2
    assert at_most(view.queue_wait[("obs.add", queue)].counts, 0.5) == 2
    # A retry to another queue: each attempt counted and measured under its own queue.
    for kind in ("task-sent", "task-received", "task-started"):
        assert series_by_name(view.task_counts[kind], "obs.retry_elsewhere") == {
            (queue,): 2,
            (prefork,): 2,
        }, kind
    assert series_by_name(view.task_counts["task-retried"], "obs.retry_elsewhere") == {(queue,): 2}
