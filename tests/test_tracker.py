"""Fast layer: the tracker fed event dicts, with an injected clock. Exact numbers throughout."""

from __future__ import annotations

import math

import pytest

from exporter.metrics import DEFAULT_BUCKETS
from exporter.tracker import Limits, Tracker, exception_class, parse_eta


class Clock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def ev(kind: str, uuid: str = "t1", ts: float = 1_000.0, **fields: object) -> dict:
    return {"type": kind, "uuid": uuid, "timestamp": ts, **fields}


def sent(
    uuid: str = "t1",
    ts: float = 1_000.0,
    name: str = "app.add",
    queue: str = "q1",
    **fields: object,
) -> dict:
    fields.setdefault("retries", 0)
    return ev("task-sent", uuid, ts, name=name, queue=queue, **fields)


def received(
    uuid: str = "t1", ts: float = 1_000.0, name: str = "app.add", **fields: object
) -> dict:
    fields.setdefault("retries", 0)
    return ev("task-received", uuid, ts, name=name, hostname="w@h", **fields)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def tracker(clock: Clock) -> Tracker:
    return Tracker(Limits(), clock=clock)


def hist_count(table: dict, key: tuple) -> int:
    return sum(table[key].counts)


def test_full_lifecycle_counts_and_durations(tracker: Tracker) -> None:
    tracker.handle_all(
        [
            sent(ts=100.0),
            received(ts=100.5),
            ev("task-started", ts=103.0),
            ev("task-succeeded", ts=104.0, runtime=0.75),
        ]
    )
    key = ("app.add", "q1")
    for kind in ("task-sent", "task-received", "task-started", "task-succeeded"):
        assert tracker.task_counts[kind] == {key: 1}, kind
    assert tracker.task_counts["task-failed"] == {}
    assert tracker.runtime[(*key, "succeeded")].sum == 0.75
    assert tracker.queue_wait[key].sum == 3.0  # sent -> started
    assert tracker.latency[key].sum == 4.0  # sent -> succeeded
    assert len(tracker.inflight) == 0
    assert list(tracker.finished) == ["t1"]


def test_histogram_buckets_are_le_inclusive(tracker: Tracker) -> None:
    tracker.handle_all([sent(), received(), ev("task-started"), ev("task-succeeded", runtime=1.0)])
    hist = tracker.runtime[("app.add", "q1", "succeeded")]
    assert hist.counts[DEFAULT_BUCKETS.index(1.0)] == 1
    assert sum(hist.counts) == 1


def test_failed_task_runtime_comes_from_started_and_exception_class(tracker: Tracker) -> None:
    tracker.handle_all(
        [
            sent(ts=10.0),
            received(ts=10.0),
            ev("task-started", ts=11.0),
            ev("task-failed", ts=13.5, exception="KeyError('x')"),
        ]
    )
    assert tracker.task_counts["task-failed"] == {("app.add", "q1", "KeyError"): 1}
    assert tracker.runtime[("app.add", "q1", "failed")].sum == 2.5
    assert tracker.latency[("app.add", "q1")].sum == 3.5


def test_worker_side_events_before_task_sent_wait_for_its_queue(tracker: Tracker) -> None:
    # A fast worker's task-received often overtakes the producer's task-sent.
    tracker.handle(received(ts=5.0))
    assert tracker.task_counts["task-received"] == {}
    tracker.handle(sent(ts=4.0))
    assert tracker.task_counts["task-received"] == {("app.add", "q1"): 1}
    assert tracker.task_counts["task-sent"] == {("app.add", "q1"): 1}


def test_parked_events_are_counted_after_the_grace_period(tracker: Tracker, clock: Clock) -> None:
    tracker.handle(received())
    tracker.handle(ev("task-started", ts=1_002.0))
    assert tracker.task_counts["task-started"] == {}
    clock.advance(1.5)
    tracker.release_expired()
    assert tracker.task_counts["task-received"] == {("app.add", "unknown"): 1}
    assert tracker.task_counts["task-started"] == {("app.add", "unknown"): 1}
    # No task-sent: the wait is measured from task-received.
    assert tracker.queue_wait[("app.add", "unknown")].sum == 2.0


def test_without_task_sent_events_nothing_is_parked(clock: Clock) -> None:
    tracker = Tracker(clock=clock)
    clock.advance(301)  # five minutes without any task-sent
    tracker.handle(received())
    assert tracker.task_counts["task-received"] == {("app.add", "unknown"): 1}
    assert not tracker.waiting


def test_eta_delay_is_not_queue_wait(tracker: Tracker) -> None:
    eta = "1970-01-01T00:01:40+00:00"  # t = 100
    tracker.handle_all(
        [
            sent(ts=40.0, eta=eta),
            received(ts=41.0, eta=eta),
            ev("task-started", ts=102.0),
            ev("task-succeeded", ts=103.0, runtime=1.0),
        ]
    )
    assert tracker.queue_wait[("app.add", "q1")].sum == 2.0
    assert tracker.latency[("app.add", "q1")].sum == 3.0


def test_negative_wait_from_clock_skew_is_clamped_and_counted(tracker: Tracker) -> None:
    tracker.handle_all([sent(ts=50.0), received(ts=49.0), ev("task-started", ts=49.5)])
    assert tracker.queue_wait[("app.add", "q1")].sum == 0.0
    assert hist_count(tracker.queue_wait, ("app.add", "q1")) == 1
    assert tracker.negative_durations == {"queue_wait": 1}


def test_duplicate_events_are_counted_once(tracker: Tracker) -> None:
    tracker.handle_all(
        [
            sent(),
            received(),
            received(),
            ev("task-started"),
            ev("task-started"),
            ev("task-succeeded", runtime=0.1),
            ev("task-succeeded", runtime=0.1),
        ]
    )
    assert tracker.task_counts["task-received"] == {("app.add", "q1"): 1}
    assert tracker.task_counts["task-started"] == {("app.add", "q1"): 1}
    assert tracker.task_counts["task-succeeded"] == {("app.add", "q1"): 1}
    assert tracker.duplicates == {"task-received": 1, "task-started": 1, "task-succeeded": 1}
    assert hist_count(tracker.runtime, ("app.add", "q1", "succeeded")) == 1


def test_hard_time_limit_double_failure_is_one_failure(tracker: Tracker) -> None:
    tb = "Traceback...\nbilliard.exceptions.TimeLimitExceeded: TimeLimitExceeded(1,)\n"
    failed = ev("task-failed", exception="ExceptionWithTraceback()", traceback=tb)
    tracker.handle_all([sent(), received(), ev("task-started"), failed, dict(failed)])
    assert tracker.task_counts["task-failed"] == {("app.add", "q1", "TimeLimitExceeded"): 1}


def test_retry_as_prefork_orders_it(tracker: Tracker) -> None:
    # Observed on a real prefork worker: the retry's task-sent/-received (published by the
    # pool child) arrive before the main process's task-retried.
    tracker.handle_all(
        [
            sent(ts=1.0),
            received(ts=1.1),
            ev("task-started", ts=1.2),
            sent(ts=1.3, retries=1, eta="1970-01-01T00:00:01.400000+00:00"),
            received(ts=1.35, retries=1),
            ev("task-retried", ts=1.36, exception="Retry()"),
            ev("task-started", ts=1.5),
            ev("task-succeeded", ts=1.6, runtime=0.1),
        ]
    )
    key = ("app.add", "q1")
    assert tracker.task_counts["task-sent"] == {key: 2}
    assert tracker.task_counts["task-received"] == {key: 2}
    assert tracker.task_counts["task-started"] == {key: 2}
    assert tracker.task_counts["task-retried"] == {key: 1}
    assert tracker.task_counts["task-succeeded"] == {key: 1}
    assert tracker.duplicates == {}
    assert hist_count(tracker.queue_wait, key) == 2
    assert tracker.queue_wait[key].sum == pytest.approx(0.2 + 0.1)  # 1.2-1.0, 1.5-eta 1.4


def test_unknown_task_takes_its_name_from_not_registered(tracker: Tracker, clock: Clock) -> None:
    tracker.handle_all(
        [
            sent(name="no.such.task"),
            ev("task-failed", exception="NotRegistered('no.such.task')"),
            ev("task-failed", uuid="t2", exception="NotRegistered('other.task')"),
        ]
    )
    clock.advance(2)  # t2's task-sent never comes
    tracker.release_expired()
    assert tracker.task_counts["task-failed"] == {
        ("no.such.task", "q1", "NotRegistered"): 1,
        ("other.task", "unknown", "NotRegistered"): 1,
    }


def test_revoked_before_received_and_rejected(tracker: Tracker) -> None:
    tracker.handle_all(
        [
            sent(uuid="r1"),
            ev("task-revoked", uuid="r1", expired=False, terminated=False),
            sent(uuid="j1"),
            received(uuid="j1"),
            ev("task-started", uuid="j1"),
            ev("task-rejected", uuid="j1", requeue=True),
        ]
    )
    assert tracker.task_counts["task-revoked"] == {("app.add", "q1"): 1}
    assert tracker.task_counts["task-rejected"] == {("app.add", "q1"): 1}
    assert "j1" in tracker.inflight  # requeued: it will be delivered again
    assert "r1" not in tracker.inflight


def test_missing_and_bad_fields_are_counted_not_fatal(tracker: Tracker) -> None:
    tracker.handle_all(
        [
            {"type": "task-started"},
            {"type": "task-succeeded", "uuid": 42},
            {"type": "worker-heartbeat"},
            {"type": "task-received", "uuid": "x", "name": None, "timestamp": "soon"},
            {"type": "something-else"},
        ]
    )
    assert tracker.malformed == {"missing_uuid": 2, "missing_hostname": 1}
    assert tracker.events_by_type["other"] == 1
    assert tracker.event_types.overflow == 1


def test_fields_of_the_wrong_type_never_stop_the_tracker(tracker: Tracker, clock: Clock) -> None:
    tracker.handle_all(
        [
            {
                "type": "task-sent",
                "uuid": "z",
                "name": ["a", "list"],
                "queue": {"a": 1},
                "retries": "x",
                "eta": 5,
                "timestamp": "x",
            },
            {"type": "task-received", "uuid": ["not", "hashable"], "name": "n"},
            {"type": "task-started", "uuid": "z", "timestamp": None},
            {"type": "task-succeeded", "uuid": "z", "timestamp": 1.0, "runtime": "fast"},
            {"type": "worker-heartbeat", "hostname": "w@h", "active": "many"},
        ]
    )
    clock.advance(2)
    tracker.release_expired()
    assert tracker.task_counts["task-sent"] == {("unknown", "unknown"): 1}
    assert tracker.task_counts["task-succeeded"] == {("unknown", "unknown"): 1}
    assert tracker.malformed == {"missing_uuid": 1}
    assert [v.active for v in tracker.worker_views()] == [0]


def test_label_limits_map_overflow_to_other_and_count_it(clock: Clock) -> None:
    tracker = Tracker(Limits(max_task_names=2, max_exceptions=1), clock=clock)
    for i, name in enumerate(["a", "b", "c", "d"]):
        tracker.handle(sent(uuid=f"u{i}", name=name))
        tracker.handle(ev("task-failed", uuid=f"u{i}", exception=f"E{i}()"))
    assert tracker.task_counts["task-sent"] == {("a", "q1"): 1, ("b", "q1"): 1, ("other", "q1"): 2}
    assert tracker.task_counts["task-failed"] == {
        ("a", "q1", "E0"): 1,
        ("b", "q1", "other"): 1,
        ("other", "q1", "other"): 2,
    }
    assert tracker.label_overflows()["name"] == 2
    assert tracker.label_overflows()["exception"] == 3


def test_memory_is_bounded_however_many_task_ids_pass(clock: Clock) -> None:
    tracker = Tracker(Limits(max_tracked_tasks=1_000, max_finished_tasks=500), clock=clock)
    for i in range(20_000):
        tracker.handle(sent(uuid=f"done-{i}"))
        tracker.handle(ev("task-succeeded", uuid=f"done-{i}", runtime=0.01))
        tracker.handle(sent(uuid=f"lost-{i}"))  # never finishes
    assert len(tracker.inflight) == 1_000
    assert len(tracker.finished) == 500
    assert tracker.evicted == 19_000
    assert tracker.task_counts["task-succeeded"] == {("app.add", "q1"): 20_000}


def test_worker_liveness_timeout_offline_and_retention(clock: Clock) -> None:
    tracker = Tracker(Limits(worker_timeout=10, worker_retention=3600), clock=clock)
    tracker.handle({"type": "worker-online", "hostname": "a@h", "active": 0})
    tracker.handle({"type": "worker-heartbeat", "hostname": "b@h", "active": 3, "processed": 7})
    views = {v.hostname: v for v in tracker.worker_views()}
    assert (views["a@h"].up, views["b@h"].up, views["b@h"].active) == (True, True, 3)
    assert views["b@h"].processed == 7

    tracker.handle({"type": "worker-offline", "hostname": "a@h"})
    clock.advance(10.5)  # b missed its heartbeats past the timeout
    views = {v.hostname: v for v in tracker.worker_views()}
    assert (views["a@h"].up, views["b@h"].up, views["b@h"].active) == (False, False, 0)

    clock.advance(3590)  # a: offline 3600.5 s ago -> dropped; b: down since t+10 -> kept
    assert [v.hostname for v in tracker.worker_views()] == ["b@h"]
    clock.advance(10)  # b: down since t+10, now 3600.5 s ago
    assert tracker.worker_views() == []

    tracker.handle({"type": "worker-heartbeat", "hostname": "b@h", "active": 1})
    assert [(v.hostname, v.up) for v in tracker.worker_views()] == [("b@h", True)]


def test_worker_table_is_bounded(clock: Clock) -> None:
    tracker = Tracker(Limits(max_workers=2), clock=clock)
    for i in range(5):
        tracker.handle({"type": "worker-heartbeat", "hostname": f"w{i}@h"})
    assert sorted(tracker.workers) == ["w0@h", "w1@h"]
    assert tracker.label_overflows()["hostname"] == 3


@pytest.mark.parametrize(
    ("exception", "traceback", "expected"),
    [
        ("ValueError('boom')", None, "ValueError"),
        ("mod.sub.Custom(1, 2)", None, "Custom"),
        ("reject requeue=False: nope", "Tb\ncelery.exceptions.Reject: ('nope', False)\n", "Reject"),
        (
            "ExceptionWithTraceback()",
            "Tb\n  File x\nbilliard.exceptions.TimeLimitExceeded: T\n",
            "TimeLimitExceeded",
        ),
        ("KeyboardInterrupt", "Tb\nKeyboardInterrupt\n", "KeyboardInterrupt"),
        (None, None, "unknown"),
        ("???", "", "unknown"),
    ],
)
def test_exception_class(exception: object, traceback: object, expected: str) -> None:
    assert exception_class(exception, traceback) == expected


def test_parse_eta() -> None:
    assert parse_eta("1970-01-01T00:01:00+00:00") == 60.0
    assert parse_eta("1970-01-01T00:01:00") == 60.0  # naive: UTC
    assert parse_eta("not a date") is None
    assert parse_eta(None) is None


def test_a_reused_task_id_is_a_new_run_not_a_duplicate(tracker: Tracker) -> None:
    for _ in range(2):  # apply_async(task_id="nightly-report") on two nights
        tracker.handle_all(
            [
                sent(uuid="nightly"),
                received(uuid="nightly"),
                ev("task-started", "nightly"),
                ev("task-succeeded", "nightly"),
            ]
        )
    assert tracker.task_counts["task-succeeded"] == {("app.add", "q1"): 2}
    assert tracker.task_counts["task-sent"] == {("app.add", "q1"): 2}
    assert tracker.duplicates == {}


def test_a_late_task_sent_for_a_finished_task_is_still_counted_once(tracker: Tracker) -> None:
    tracker.handle_all([received(), ev("task-started"), ev("task-succeeded", runtime=0.1)])
    tracker.release_expired(tracker.monotonic() + 2)
    tracker.handle(sent())
    assert tracker.task_counts["task-sent"] == {("app.add", "q1"): 1}
    assert tracker.task_counts["task-succeeded"] == {("app.add", "unknown"): 1}
    assert tracker.duplicates == {}


def test_parking_and_liveness_ignore_wall_clock_steps() -> None:
    wall, mono = Clock(1_000_000.0), Clock(50.0)
    tracker = Tracker(Limits(worker_timeout=10), clock=wall, monotonic=mono)
    tracker.handle(received())
    tracker.handle({"type": "worker-heartbeat", "hostname": "w@h"})
    wall.advance(-3600)  # NTP steps the wall clock back an hour
    mono.advance(2)
    tracker.release_expired()
    assert tracker.task_counts["task-received"] == {("app.add", "unknown"): 1}
    [view] = tracker.worker_views()
    assert (view.up, view.last_seen) == (True, 1_000_000.0)  # exported as wall time
    mono.advance(9)
    assert [v.up for v in tracker.worker_views()] == [False]


def test_parked_events_survive_their_record_being_evicted(clock: Clock) -> None:
    tracker = Tracker(Limits(max_tracked_tasks=2), clock=clock)
    tracker.handle(received(uuid="a"))
    tracker.handle(received(uuid="b"))
    tracker.handle(received(uuid="c"))  # evicts a's record while a's event is parked
    tracker.handle(ev("task-started", "a"))
    clock.advance(2)
    tracker.release_expired()
    assert tracker.task_counts["task-received"] == {("app.add", "unknown"): 3}
    # Replayed in order, a's events rebuild its record: the name survives the eviction.
    assert tracker.task_counts["task-started"] == {("app.add", "unknown"): 1}
    # c evicts a; replaying a, b, c then evicts b, c, a in turn: a 2-slot table churns.
    assert tracker.evicted == 4


def test_values_no_event_should_hold_are_counted_and_skipped(tracker: Tracker, clock) -> None:
    tracker.handle_all(
        [
            {"type": "task-received", "uuid": ""},
            sent(uuid="x"),
            received(uuid="x"),
            ev("task-started", "x", ts=1.0),
            ev("task-succeeded", "x", ts=float("inf"), runtime=10**400),
            sent(uuid="y"),
            ev("task-failed", "y", ts=float("nan"), exception="E()"),
        ]
    )
    assert tracker.task_counts["task-succeeded"] == {("app.add", "q1"): 1}
    assert tracker.task_counts["task-failed"] == {("app.add", "q1", "E"): 1}
    assert all(math.isfinite(h.sum) for t in (tracker.runtime, tracker.latency) for h in t.values())
    # "" as uuid; a runtime past float range; a NaN finish time (its latency is skipped).
    assert tracker.malformed == {"missing_uuid": 1, "bad_field": 1, "non_finite": 1}
    assert len(tracker.inflight) == 0
