"""Properties of the tracker over generated lifecycles (hypothesis): counters count events.

Whatever order a task's events arrive in, and whatever is delivered twice, every counter equals
the number of distinct events of its type (what Celery's own receiver would count), durations
are never negative or infinite, and a stream replayed whole counts nothing more.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from celery_obs.exporter.occupancy import NOWHERE, RUNNING, WAITING
from celery_obs.exporter.tracker import Tracker

from test_tracker import Clock

WORKERS = ("a@h", "b@h")
ENDS = ("task-succeeded", "task-failed")


@st.composite
def lifecycle(draw: st.DrawFn, uuid: str, name: str) -> list[dict]:
    """One task id's events in their true order: attempts 0..n, each sent, received by some
    worker, started, then retried (all but the last) or succeeded/failed/revoked/rejected."""
    attempts = draw(st.integers(min_value=1, max_value=4))
    t = draw(st.floats(min_value=0, max_value=1_000, allow_nan=False))
    events: list[dict] = []
    for retries in range(attempts):
        worker = draw(st.sampled_from(WORKERS))
        countdown = draw(st.sampled_from([0.0, 0.5, 2.0]))
        base = {"uuid": uuid, "utcoffset": 0}
        events.append(
            {
                **base,
                "type": "task-sent",
                "name": name,
                "queue": f"q-{name}",
                "retries": retries,
                "timestamp": t,
                "hostname": f"gen{retries}@producer",
            }
        )
        events.append(
            {
                **base,
                "type": "task-received",
                "name": name,
                "retries": retries,
                "timestamp": t + 0.01,
                "hostname": worker,
            }
        )
        start = t + 0.02 + countdown
        events.append({**base, "type": "task-started", "timestamp": start, "hostname": worker})
        end_at = start + draw(st.floats(min_value=0.001, max_value=5))
        last = retries == attempts - 1
        kind = draw(st.sampled_from([*ENDS, "task-revoked"])) if last else "task-retried"
        end = {**base, "type": kind, "timestamp": end_at, "hostname": worker}
        if kind == "task-succeeded":
            end["runtime"] = end_at - start
        elif kind == "task-failed":
            end["exception"] = "ValueError('x')"
        events.append(end)
        t = end_at + 0.001
    return events


@st.composite
def stream(draw: st.DrawFn) -> tuple[list[dict], list[dict]]:
    """(distinct events, what arrives: any order, some events delivered more than once)."""
    events: list[dict] = []
    for i in range(draw(st.integers(min_value=1, max_value=4))):
        events += draw(lifecycle(f"task-{i}", draw(st.sampled_from(["app.a", "app.b"]))))
    again = draw(st.lists(st.sampled_from(events), max_size=6))
    arriving = draw(st.permutations(events + [dict(e) for e in again]))
    return events, arriving


def counted(tracker: Tracker) -> Counter:
    tracker.tick()
    result: Counter = Counter()
    for kind, series in tracker.view().task_counts.items():
        for labels, value in series.items():
            result[(kind, labels[0], labels[1])] += value
    return result


def expected(events: list[dict]) -> Counter:
    names = {e["uuid"]: e["name"] for e in events if "name" in e}
    return Counter((e["type"], names[e["uuid"]], f"q-{names[e['uuid']]}") for e in events)


@settings(max_examples=300, deadline=None)
@given(stream())
def test_any_order_and_any_redelivery_give_the_same_counters(case) -> None:
    events, arriving = case
    tracker = Tracker(clock=Clock())
    tracker.handle_all(dict(e) for e in arriving)
    assert counted(tracker) == expected(events)
    view = tracker.view()
    assert sum(view.duplicates.values()) == len(arriving) - len(events)
    for table in (view.runtime, view.queue_wait, view.latency):
        for hist in table.values():
            assert 0 <= hist.sum < float("inf")


@settings(max_examples=100, deadline=None)
@given(stream())
def test_a_stream_delivered_twice_counts_once(case) -> None:
    events, _ = case
    tracker = Tracker(clock=Clock())
    tracker.handle_all(dict(e) for e in events)
    first = counted(tracker)
    view = tracker.view()
    observed = {
        name: sum(sum(h.counts) for h in getattr(view, name).values())
        for name in ("runtime", "queue_wait", "latency")
    }
    tracker.handle_all(dict(e) for e in events)
    assert counted(tracker) == first == expected(events)
    view = tracker.view()
    assert observed == {
        name: sum(sum(h.counts) for h in getattr(view, name).values())
        for name in ("runtime", "queue_wait", "latency")
    }


@settings(max_examples=200, deadline=None)
@given(stream())
def test_in_true_order_every_duration_is_measured(case) -> None:
    events, _ = case
    tracker = Tracker(clock=Clock())
    tracker.handle_all(dict(e) for e in events)
    tracker.tick()
    view = tracker.view()
    kinds = Counter(e["type"] for e in events)
    assert view.unmeasured == {}
    assert sum(sum(h.counts) for h in view.queue_wait.values()) == kinds["task-started"]
    assert sum(sum(h.counts) for h in view.runtime.values()) == sum(kinds[k] for k in ENDS)
    assert sum(sum(h.counts) for h in view.latency.values()) == sum(kinds[k] for k in ENDS)


def assert_occupancy_consistent(tracker: Tracker) -> None:
    """Every delivery is in exactly the place it says, and held by its worker."""
    occupancy = tracker.tasks.occupancy
    for place, table in ((RUNNING, occupancy.running), (WAITING, occupancy.waiting)):
        for delivery in table:
            assert delivery.place == place
            assert not delivery.end
            assert delivery in occupancy.by_host[delivery.host]
    held = [d for deliveries in occupancy.by_host.values() for d in deliveries]
    assert all(d.place != NOWHERE for d in held)
    assert len(held) == len(occupancy.running) + len(occupancy.waiting) + occupancy.scheduled


@st.composite
def interleaved(draw: st.DrawFn) -> list[dict]:
    """Several lifecycles, each in its true order, interleaved at random (as the stream of a
    busy cluster arrives)."""
    lifecycles = [
        draw(lifecycle(f"task-{i}", draw(st.sampled_from(["app.a", "app.b"]))))
        for i in range(draw(st.integers(min_value=1, max_value=5)))
    ]
    order = draw(st.permutations([i for i, events in enumerate(lifecycles) for _ in events]))
    queues = [list(events) for events in lifecycles]
    return [queues[i].pop(0) for i in order]


@settings(max_examples=200, deadline=None)
@given(interleaved())
def test_once_every_task_has_finished_nothing_runs_or_waits(events) -> None:
    tracker = Tracker(clock=Clock())
    for event in events:
        tracker.handle(dict(event))
        assert_occupancy_consistent(tracker)
    tracker.tick()
    view = tracker.view()
    assert (view.running.counts, view.waiting.counts, view.reserved) == ({}, {}, {})
    assert tracker.tasks.occupancy.by_host == {}


@settings(max_examples=200, deadline=None)
@given(stream())
def test_in_any_order_the_places_stay_consistent(case) -> None:
    _, arriving = case
    tracker = Tracker(clock=Clock())
    for event in arriving:
        tracker.handle(dict(event))
        assert_occupancy_consistent(tracker)
    tracker.tick()
    view = tracker.view()
    assert all(n > 0 for n in (*view.running.counts.values(), *view.waiting.counts.values()))
