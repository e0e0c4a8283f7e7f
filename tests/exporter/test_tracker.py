"""Fast layer: the tracker fed event dicts, with an injected clock. Exact numbers throughout."""

from __future__ import annotations

import math

import pytest

from celery_obs.exporter.config import Limits
from celery_obs.exporter.fields import exception_class, parse_eta
from celery_obs.exporter.metrics import RUNTIME_BUCKETS
from celery_obs.exporter.tracker import Tracker, TrackerView

WORKER = "w@h"
KEY = ("app.add", "q1")


class Clock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def ev(
    kind: str, uuid: str = "t1", ts: float = 1_000.0, hostname: str = WORKER, **fields: object
) -> dict:
    """A worker-side event (main process of `hostname`)."""
    return {"type": kind, "uuid": uuid, "timestamp": ts, "hostname": hostname, **fields}


def sent(
    uuid: str = "t1",
    ts: float = 1_000.0,
    name: str = "app.add",
    queue: str = "q1",
    **fields: object,
) -> dict:
    fields.setdefault("retries", 0)
    fields.setdefault("hostname", "gen1@producer")
    return {
        "type": "task-sent",
        "uuid": uuid,
        "timestamp": ts,
        "name": name,
        "queue": queue,
        **fields,
    }


def received(
    uuid: str = "t1", ts: float = 1_000.0, name: str = "app.add", **fields: object
) -> dict:
    fields.setdefault("retries", 0)
    fields.setdefault("hostname", WORKER)
    return {"type": "task-received", "uuid": uuid, "timestamp": ts, "name": name, **fields}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def tracker(clock: Clock) -> Tracker:
    return Tracker(Limits(), clock=clock)


def state(tracker: Tracker) -> TrackerView:
    """What a scrape would see now."""
    tracker.tick()
    return tracker.view()


def counts(tracker: Tracker, kind: str) -> dict:
    return dict(state(tracker).task_counts[kind])


def observations(table, key) -> tuple[int, float]:
    """(count, sum) of one histogram series, sum rounded to the microsecond."""
    hist = table[key]
    return sum(hist.counts), round(hist.sum, 6)


# -- counting -----------------------------------------------------------------------------------


def test_full_lifecycle_counts_and_durations(tracker: Tracker) -> None:
    tracker.handle_all(
        [
            sent(ts=100.0),
            received(ts=100.5),
            ev("task-started", ts=103.0),
            ev("task-succeeded", ts=104.0, runtime=0.75),
        ]
    )
    view = state(tracker)
    for kind in ("task-sent", "task-received", "task-started", "task-succeeded"):
        assert view.task_counts[kind] == {KEY: 1}, kind
    assert view.task_counts["task-failed"] == {}
    assert observations(view.runtime, (*KEY, "succeeded")) == (1, 0.75)
    assert observations(view.queue_wait, KEY) == (1, 3.0)  # sent -> started
    assert observations(view.latency, KEY) == (1, 4.0)  # sent -> succeeded
    assert view.tasks_tracked == 0
    assert list(tracker.tasks.finished) == ["t1"]


def test_histogram_buckets_are_le_inclusive(tracker: Tracker) -> None:
    tracker.handle_all([sent(), received(), ev("task-started"), ev("task-succeeded", runtime=1.0)])
    hist = state(tracker).runtime[(*KEY, "succeeded")]
    assert hist.counts[RUNTIME_BUCKETS.index(1.0)] == 1
    assert sum(hist.counts) == 1


def test_a_redelivered_event_is_counted_once(tracker: Tracker) -> None:
    lifecycle = [
        sent(),
        received(),
        ev("task-started", ts=1_001.0),
        ev("task-succeeded", ts=1_002.0, runtime=0.1),
    ]
    tracker.handle_all([lifecycle[0], lifecycle[1], dict(lifecycle[1]), *lifecycle[2:]])
    tracker.handle_all([dict(e) for e in lifecycle])  # the whole finished lifecycle again
    view = state(tracker)
    for kind in ("task-sent", "task-received", "task-started", "task-succeeded"):
        assert view.task_counts[kind] == {KEY: 1}, kind
    assert view.duplicates == {
        "task-sent": 1,
        "task-received": 2,
        "task-started": 1,
        "task-succeeded": 1,
    }
    assert observations(view.runtime, (*KEY, "succeeded")) == (1, 0.1)
    assert observations(view.queue_wait, KEY) == (1, 1.0)


def test_same_type_twice_with_another_timestamp_is_two_events(tracker: Tracker) -> None:
    # A hard time limit: Celery sends task-failed from on_timeout and again from on_failure,
    # ~1 ms apart. Celery's own Receiver counts both, so do we; the failure is measured once.
    tb = "Traceback...\nbilliard.exceptions.TimeLimitExceeded: TimeLimitExceeded(1,)\n"
    tracker.handle_all(
        [
            sent(ts=10.0),
            received(ts=10.0),
            ev("task-started", ts=10.5),
            ev("task-failed", ts=11.5, exception="ExceptionWithTraceback()", traceback=tb),
            ev("task-failed", ts=11.501, exception="ExceptionWithTraceback()", traceback=tb),
        ]
    )
    view = state(tracker)
    assert view.task_counts["task-failed"] == {(*KEY, "TimeLimitExceeded"): 2}
    assert view.duplicates == {}
    assert observations(view.runtime, (*KEY, "failed")) == (1, 1.0)
    assert observations(view.latency, KEY) == (1, 1.5)
    assert view.unmeasured == {}


def test_events_of_other_workers_are_not_duplicates(tracker: Tracker) -> None:
    # Two workers can stamp the same time; the hostname tells their events apart.
    tracker.handle_all(
        [
            sent(),
            received(ts=1.0, hostname="a@h"),
            ev("task-rejected", ts=2.0, hostname="a@h", requeue=True),
            received(ts=1.0, hostname="b@h"),
            ev("task-rejected", ts=2.0, hostname="b@h", requeue=True),
        ]
    )
    assert counts(tracker, "task-received") == {KEY: 2}
    assert counts(tracker, "task-rejected") == {KEY: 2}


# -- attempts: counted whatever their order, measured only where the pairing is certain ----------


def prefork_retry(uuid: str = "t1") -> list[dict]:
    """Two attempts as a real prefork worker orders them: the retry's task-sent (from the pool
    child) overtakes attempt 0's task-started and task-retried (buffered by the main process)."""
    return [
        sent(uuid, ts=1.0),
        received(uuid, ts=1.1),
        sent(uuid, ts=1.3, retries=1, eta="1970-01-01T00:00:02+00:00"),  # countdown=0.7
        ev("task-started", uuid, ts=1.2),
        ev("task-retried", uuid, ts=1.31, exception="Retry()"),
        received(uuid, ts=1.35, retries=1, eta="1970-01-01T00:00:02+00:00"),
        ev("task-started", uuid, ts=2.1),
        ev("task-succeeded", uuid, ts=2.15, runtime=0.05),
    ]


def test_a_retry_counts_every_attempt_and_measures_each(tracker: Tracker) -> None:
    tracker.handle_all(prefork_retry())
    view = state(tracker)
    for kind, n in [("task-sent", 2), ("task-received", 2), ("task-started", 2)]:
        assert view.task_counts[kind] == {KEY: n}, kind
    assert view.task_counts["task-retried"] == {KEY: 1}
    assert view.task_counts["task-succeeded"] == {KEY: 1}
    # Per attempt: 1.2 - 1.0, then 2.1 - its ETA 2.0 (the countdown is not a queue wait).
    assert observations(view.queue_wait, KEY) == (2, 0.3)
    # Only the attempt that succeeded: its own runtime, not the countdown before it.
    assert observations(view.runtime, (*KEY, "succeeded")) == (1, 0.05)
    # First send to success; the retry's countdown is part of what the caller waited.
    assert observations(view.latency, KEY) == (1, 1.15)
    assert (view.duplicates, view.negative_durations, view.unmeasured) == ({}, {}, {})


def test_the_next_attempt_received_before_this_one_ended_on_the_same_worker(
    tracker: Tracker,
) -> None:
    # A worker with two threads holds attempt 1 (an ETA message) while attempt 0 still runs,
    # and attempt 0's task-retried is stamped after attempt 1's task-received.
    tracker.handle_all(
        [
            sent(ts=1.0),
            received(ts=1.01),
            ev("task-started", ts=1.02),
            received(ts=1.05, retries=1, eta="1970-01-01T00:00:01.250000+00:00"),
            sent(ts=1.04, retries=1, eta="1970-01-01T00:00:01.250000+00:00"),
            ev("task-retried", ts=1.06),
            ev("task-started", ts=1.26),
            ev("task-failed", ts=1.5, exception="KeyError('x')"),
        ]
    )
    view = state(tracker)
    assert view.task_counts["task-started"] == {KEY: 2}
    assert observations(view.queue_wait, KEY) == (2, 0.03)  # 0.02 + (1.26 - 1.25)
    assert observations(view.runtime, (*KEY, "failed")) == (1, 0.24)  # 1.5 - 1.26
    assert observations(view.latency, KEY) == (1, 0.5)
    assert view.unmeasured == {}


def test_a_worker_receives_the_retry_before_it_reports_the_first_start(
    tracker: Tracker,
) -> None:
    # The main process may read the retry message off the broker before the pool child's
    # "accepted" message: its events then say received(0), received(1), started, started.
    tracker.handle_all(
        [
            sent(ts=1.0),
            received(ts=1.1),
            sent(ts=1.15, retries=1),
            received(ts=1.2, retries=1),
            ev("task-started", ts=1.25),
            ev("task-retried", ts=1.3),
            ev("task-started", ts=1.4),
            ev("task-succeeded", ts=1.5, runtime=0.1),
        ]
    )
    view = state(tracker)
    assert observations(view.queue_wait, KEY) == (2, 0.5)  # 1.25 - 1.0, then 1.4 - 1.15
    assert view.negative_durations == {}


def test_attempts_only_move_forward(tracker: Tracker) -> None:
    # A late task-sent(retries=2) after retries=3 is counted, and changes nothing else.
    events = [
        sent(ts=1.0),
        *(sent(ts=1.0 + n, retries=n) for n in (1, 3)),
        received(ts=4.1, retries=3),
        sent(ts=3.0, retries=2),
        ev("task-started", ts=4.2),
        ev("task-retried", ts=4.3),
    ]
    tracker.handle_all(events)
    view = state(tracker)
    assert view.task_counts["task-sent"] == {KEY: 4}
    assert view.task_counts["task-retried"] == {KEY: 1}
    assert observations(view.queue_wait, KEY) == (1, 0.2)  # 4.2 - attempt 3's send at 4.0


def test_an_event_that_cannot_be_placed_is_counted_and_measures_nothing(
    tracker: Tracker,
) -> None:
    # The exporter started after the task-received: the start has no delivery to belong to.
    tracker.handle_all(
        [
            sent(ts=1.0),
            ev("task-started", ts=2.0),
            ev("task-failed", ts=3.0, exception="E()"),
        ]
    )
    view = state(tracker)
    assert view.task_counts["task-started"] == {KEY: 1}
    assert view.task_counts["task-failed"] == {(*KEY, "E"): 1}
    assert view.queue_wait == {}
    assert view.runtime == {}
    assert observations(view.latency, KEY) == (1, 2.0)  # first send to failure is certain
    assert view.unmeasured == {("queue_wait", "unplaced"): 1, ("runtime", "unplaced"): 1}


def test_latency_needs_the_first_attempt(tracker: Tracker) -> None:
    tracker.handle_all(
        [
            sent(ts=5.0, retries=2),
            received(ts=5.1, retries=2),
            ev("task-started", ts=5.2),
            ev("task-succeeded", ts=5.3, runtime=0.1),
        ]
    )
    view = state(tracker)
    assert view.latency == {}
    assert view.unmeasured == {("latency", "first_attempt_unseen"): 1}


def test_a_start_that_overtakes_its_send_waits_for_it(tracker: Tracker) -> None:
    tracker.handle_all(
        [
            sent(ts=1.0),
            received(ts=1.1),
            ev("task-started", ts=1.2),
            ev("task-retried", ts=1.3),
            received(ts=1.5, retries=1),
            ev("task-started", ts=1.6),
        ]
    )
    assert observations(state(tracker).queue_wait, KEY) == (1, 0.2)  # attempt 1 waits
    tracker.handle(sent(ts=1.4, retries=1))
    assert observations(state(tracker).queue_wait, KEY) == (2, 0.4)  # 0.2 + (1.6 - 1.4)


def test_a_start_whose_send_never_comes_waits_from_its_receipt(tracker: Tracker) -> None:
    tracker.handle_all(
        [
            sent(ts=1.0),
            received(ts=1.1),
            ev("task-started", ts=1.2),
            ev("task-retried", ts=1.3),
            received(ts=1.5, retries=1),
            ev("task-started", ts=1.6),
            ev("task-succeeded", ts=1.7, runtime=0.1),
        ]
    )
    assert observations(state(tracker).queue_wait, KEY) == (2, 0.3)  # 0.2 + (1.6 - 1.5)


# -- durations ----------------------------------------------------------------------------------


def test_failed_task_runtime_comes_from_started_and_exception_class(tracker: Tracker) -> None:
    tracker.handle_all(
        [
            sent(ts=10.0),
            received(ts=10.0),
            ev("task-started", ts=11.0),
            ev("task-failed", ts=13.5, exception="KeyError('x')"),
        ]
    )
    view = state(tracker)
    assert view.task_counts["task-failed"] == {(*KEY, "KeyError"): 1}
    assert observations(view.runtime, (*KEY, "failed")) == (1, 2.5)
    assert observations(view.latency, KEY) == (1, 3.5)


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
    view = state(tracker)
    assert observations(view.queue_wait, KEY) == (1, 2.0)
    assert observations(view.latency, KEY) == (1, 3.0)


def test_a_start_just_before_its_send_is_zero_not_skew(tracker: Tracker) -> None:
    # task-sent is stamped after the publish: a quick worker starts "before" it.
    tracker.handle_all([sent(ts=50.0), received(ts=49.99), ev("task-started", ts=49.995)])
    view = state(tracker)
    assert observations(view.queue_wait, KEY) == (1, 0.0)
    assert view.negative_durations == {}


def test_clock_skew_past_the_tolerance_is_counted_and_observed_as_zero(
    tracker: Tracker,
) -> None:
    tracker.handle_all([sent(ts=50.0), received(ts=45.0), ev("task-started", ts=45.5)])
    view = state(tracker)
    assert observations(view.queue_wait, KEY) == (1, 0.0)
    assert view.negative_durations == {"queue_wait": 1}


# -- parking for the queue label ----------------------------------------------------------------


def test_worker_side_events_before_task_sent_wait_for_its_queue(tracker: Tracker) -> None:
    # A fast worker's task-received often overtakes the producer's task-sent.
    tracker.handle(received(ts=5.0))
    assert counts(tracker, "task-received") == {}
    tracker.handle(sent(ts=4.0))
    assert counts(tracker, "task-received") == {KEY: 1}
    assert counts(tracker, "task-sent") == {KEY: 1}


def test_parked_events_are_counted_after_the_grace_period(tracker: Tracker, clock: Clock) -> None:
    tracker.handle(received())
    tracker.handle(ev("task-started", ts=1_002.0))
    assert counts(tracker, "task-started") == {}
    clock.advance(1.5)
    view = state(tracker)
    assert view.task_counts["task-received"] == {("app.add", "unknown"): 1}
    assert view.task_counts["task-started"] == {("app.add", "unknown"): 1}
    # No task-sent: the wait is measured from task-received once the delivery ends.
    assert view.queue_wait == {}
    tracker.handle(ev("task-succeeded", ts=1_003.0, runtime=1.0))
    assert observations(state(tracker).queue_wait, ("app.add", "unknown")) == (1, 2.0)


def test_without_task_sent_events_nothing_is_parked_or_deferred(clock: Clock) -> None:
    tracker = Tracker(clock=clock)
    clock.advance(301)  # five minutes without any task-sent
    tracker.handle_all([received(ts=1.0), ev("task-started", ts=1.5)])
    view = state(tracker)
    assert view.task_counts["task-received"] == {("app.add", "unknown"): 1}
    assert observations(view.queue_wait, ("app.add", "unknown")) == (1, 0.5)
    assert not tracker.tasks.waiting


def test_parked_events_survive_their_record_being_evicted(clock: Clock) -> None:
    tracker = Tracker(Limits(max_tracked_tasks=2), clock=clock)
    tracker.handle(received(uuid="a"))
    tracker.handle(received(uuid="b"))
    tracker.handle(received(uuid="c"))  # evicts a's record while a's event is parked
    tracker.handle(ev("task-started", "a"))
    clock.advance(2)
    view = state(tracker)
    assert view.task_counts["task-received"] == {("app.add", "unknown"): 3}
    # Replayed in order, a's events rebuild its record: the name survives the eviction.
    assert view.task_counts["task-started"] == {("app.add", "unknown"): 1}
    # c evicts a; replaying a, b, c then evicts b, c, a in turn: a 2-slot table churns.
    assert view.tasks_evicted == 4


def test_parking_and_liveness_ignore_wall_clock_steps() -> None:
    wall, mono = Clock(1_000_000.0), Clock(50.0)
    tracker = Tracker(Limits(worker_timeout=10), clock=wall, monotonic=mono)
    tracker.handle(received())
    tracker.handle({"type": "worker-heartbeat", "hostname": WORKER})
    wall.advance(-3600)  # NTP steps the wall clock back an hour
    mono.advance(2)
    view = state(tracker)
    assert view.task_counts["task-received"] == {("app.add", "unknown"): 1}
    [worker] = view.workers
    assert (worker.up, worker.last_seen) == (True, 1_000_000.0)  # exported as wall time
    mono.advance(9)
    assert [w.state for w in state(tracker).workers] == ["lost"]


# -- special lifecycles -------------------------------------------------------------------------


def test_unknown_task_takes_its_name_from_not_registered(tracker: Tracker, clock: Clock) -> None:
    tracker.handle_all(
        [
            sent(name="no.such.task"),
            ev("task-failed", exception="NotRegistered('no.such.task')"),
            ev("task-failed", uuid="t2", exception="NotRegistered('other.task')"),
        ]
    )
    clock.advance(2)  # t2's task-sent never comes
    view = state(tracker)
    assert view.task_counts["task-failed"] == {
        ("no.such.task", "q1", "NotRegistered"): 1,
        ("other.task", "unknown", "NotRegistered"): 1,
    }
    assert view.runtime == {}  # it never ran: nothing to measure, nothing missing
    assert view.unmeasured == {("latency", "first_attempt_unseen"): 1}  # t2: no send, no receipt


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
    view = state(tracker)
    assert view.task_counts["task-revoked"] == {KEY: 1}
    assert view.task_counts["task-rejected"] == {KEY: 1}
    assert "j1" in tracker.tasks.inflight  # requeued: it will be delivered again
    assert "r1" not in tracker.tasks.inflight


def test_a_reused_task_id_is_a_new_run_not_a_duplicate(tracker: Tracker) -> None:
    for night in range(2):  # apply_async(task_id="nightly-report") on two nights
        t = night * 86_400.0
        tracker.handle_all(
            [
                sent(uuid="nightly", ts=t),
                received(uuid="nightly", ts=t + 1),
                ev("task-started", "nightly", ts=t + 2),
                ev("task-succeeded", "nightly", ts=t + 3, runtime=1.0),
            ]
        )
    view = state(tracker)
    assert view.task_counts["task-succeeded"] == {KEY: 2}
    assert view.task_counts["task-sent"] == {KEY: 2}
    assert view.duplicates == {}
    assert observations(view.latency, KEY) == (2, 6.0)


def test_a_late_task_sent_for_a_finished_task_is_still_counted_once(
    tracker: Tracker, clock: Clock
) -> None:
    tracker.handle_all([received(), ev("task-started"), ev("task-succeeded", runtime=0.1)])
    clock.advance(2)
    tracker.tick()
    tracker.handle(sent())
    view = state(tracker)
    assert view.task_counts["task-sent"] == {KEY: 1}
    assert view.task_counts["task-succeeded"] == {("app.add", "unknown"): 1}
    assert view.duplicates == {}


# -- bad input costs only itself ----------------------------------------------------------------


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
    view = state(tracker)
    assert view.malformed == {"missing_uuid": 2, "missing_hostname": 1}
    assert view.events_by_type["other"] == 1
    assert view.label_overflows["type"] == 1


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
            {"type": "worker-heartbeat", "hostname": WORKER, "active": "many"},
        ]
    )
    clock.advance(2)
    view = state(tracker)
    assert view.task_counts["task-sent"] == {("unknown", "unknown"): 1}
    assert view.task_counts["task-started"] == {("unknown", "unknown"): 1}
    assert view.task_counts["task-succeeded"] == {("unknown", "unknown"): 1}
    assert view.malformed == {"missing_uuid": 1}
    assert [w.active for w in view.workers] == [0]


def test_values_no_event_should_hold_are_counted_and_skipped(tracker: Tracker) -> None:
    tracker.handle_all(
        [
            {"type": "task-received", "uuid": ""},
            sent(uuid="x"),
            received(uuid="x"),
            ev("task-started", "x", ts=1.0),
            ev("task-succeeded", "x", ts=float("inf"), runtime=10**400),
            sent(uuid="y", ts=-1e308),
            ev("task-failed", "y", ts=1e308, exception="E()"),
        ]
    )
    view = state(tracker)
    assert view.task_counts["task-succeeded"] == {KEY: 1}
    assert view.task_counts["task-failed"] == {(*KEY, "E"): 1}
    assert all(math.isfinite(h.sum) for t in (view.runtime, view.latency) for h in t.values())
    # "" as uuid; a runtime past float range and an infinite finish time (no runtime, no
    # latency); a latency of 2e308 (infinite), and a failure whose run was not seen. Each costs
    # only its own measurement.
    assert view.malformed == {"missing_uuid": 1}
    assert view.unmeasured == {
        ("runtime", "no_timestamp"): 1,
        ("latency", "no_timestamp"): 1,
        ("latency", "implausible"): 1,
        ("runtime", "unplaced"): 1,
    }
    assert view.tasks_tracked == 0


# -- bounds -------------------------------------------------------------------------------------


def test_label_limits_map_overflow_to_other_and_count_it(clock: Clock) -> None:
    tracker = Tracker(Limits(max_task_names=2, max_exceptions=1), clock=clock)
    for i, name in enumerate(["a", "b", "c", "d"]):
        tracker.handle(sent(uuid=f"u{i}", name=name))
        tracker.handle(ev("task-failed", uuid=f"u{i}", exception=f"E{i}()"))
    view = state(tracker)
    assert view.task_counts["task-sent"] == {("a", "q1"): 1, ("b", "q1"): 1, ("other", "q1"): 2}
    assert view.task_counts["task-failed"] == {
        ("a", "q1", "E0"): 1,
        ("b", "q1", "other"): 1,
        ("other", "q1", "other"): 2,
    }
    assert view.label_overflows["name"] == 2
    assert view.label_overflows["exception"] == 3


def test_memory_is_bounded_however_many_task_ids_pass(clock: Clock) -> None:
    tracker = Tracker(Limits(max_tracked_tasks=1_000, max_finished_tasks=500), clock=clock)
    for i in range(20_000):
        tracker.handle(sent(uuid=f"done-{i}"))
        tracker.handle(ev("task-succeeded", uuid=f"done-{i}", runtime=0.01))
        tracker.handle(sent(uuid=f"lost-{i}"))  # never finishes
    view = state(tracker)
    assert len(tracker.tasks.inflight) == view.tasks_tracked == 1_000
    assert len(tracker.tasks.finished) == 500
    assert view.tasks_evicted == 19_000
    assert view.task_counts["task-succeeded"] == {KEY: 20_000}


# -- workers ------------------------------------------------------------------------------------


def test_worker_offline_is_graceful_and_silence_is_lost(clock: Clock) -> None:
    tracker = Tracker(Limits(worker_timeout=10, worker_retention=3600), clock=clock)
    tracker.handle({"type": "worker-online", "hostname": "a@h", "active": 0})
    tracker.handle({"type": "worker-heartbeat", "hostname": "b@h", "active": 3, "processed": 7})
    workers = {w.hostname: w for w in state(tracker).workers}
    assert (workers["a@h"].state, workers["b@h"].state, workers["b@h"].active) == (
        "online",
        "online",
        3,
    )
    assert workers["b@h"].processed == 7

    tracker.handle({"type": "worker-offline", "hostname": "a@h"})  # scale-in: says goodbye
    clock.advance(10.5)  # b missed its heartbeats past the timeout
    workers = {w.hostname: w for w in state(tracker).workers}
    assert (workers["a@h"].state, workers["b@h"].state, workers["b@h"].active) == (
        "offline",
        "lost",
        0,
    )
    assert not workers["a@h"].up
    assert not workers["b@h"].up

    clock.advance(3590)  # a: offline 3600.5 s ago -> dropped; b: down since t+10 -> kept
    assert [w.hostname for w in state(tracker).workers] == ["b@h"]
    clock.advance(10)  # b: down since t+10, now 3600.5 s ago
    assert state(tracker).workers == []

    tracker.handle({"type": "worker-heartbeat", "hostname": "b@h", "active": 1})
    assert [(w.hostname, w.state) for w in state(tracker).workers] == [("b@h", "online")]


def test_a_full_worker_table_makes_room_from_down_workers_first(clock: Clock) -> None:
    tracker = Tracker(Limits(max_workers=3, worker_timeout=10), clock=clock)
    for name in ("old", "gone", "live"):
        tracker.handle({"type": "worker-heartbeat", "hostname": f"{name}@h"})
        clock.advance(1)
    tracker.handle({"type": "worker-offline", "hostname": "gone@h"})
    clock.advance(9.5)  # old: silent 11.5 s (lost since t+10); live: 9.5 s (up)
    tracker.handle({"type": "worker-heartbeat", "hostname": "live@h"})
    tracker.handle({"type": "worker-heartbeat", "hostname": "new1@h"})  # evicts old (down first)
    tracker.handle({"type": "worker-heartbeat", "hostname": "new2@h"})  # evicts gone
    tracker.handle({"type": "worker-heartbeat", "hostname": "new3@h"})  # all up: refused
    view = state(tracker)
    assert sorted(w.hostname for w in view.workers) == ["live@h", "new1@h", "new2@h"]
    assert view.workers_evicted == 2
    assert view.label_overflows["hostname"] == 1


# -- field parsing ------------------------------------------------------------------------------


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


# -- deliveries that never end, and ids sent again (found by review, shapes from real workers) --


def test_a_killed_run_delivered_again_to_the_same_worker_does_not_take_later_events(
    tracker: Tracker,
) -> None:
    # acks_late: the worker is SIGKILLed mid-run and comes back under the same name; the
    # message is delivered again, retried with a 10 s countdown, and attempt 1 fails.
    eta = "1970-01-01T00:00:41+00:00"
    tracker.handle_all(
        [
            sent(ts=0.0),
            received(ts=0.1),
            ev("task-started", ts=0.2),  # ... and nothing more from that run
            received(ts=30.0),
            ev("task-started", ts=30.1),
            sent(ts=31.0, retries=1, eta=eta),
            ev("task-retried", ts=31.01),
            received(ts=31.05, retries=1, eta=eta),
            ev("task-started", ts=41.0),
            ev("task-failed", ts=42.0, exception="ValueError('x')"),
        ]
    )
    view = state(tracker)
    assert observations(view.runtime, (*KEY, "failed")) == (1, 1.0)  # not 11.9: no countdown
    assert view.unmeasured == {}


def test_task_cancelled_ends_its_delivery(tracker: Tracker) -> None:
    tracker.handle_all(
        [
            sent(ts=0.0),
            received(ts=0.1),
            ev("task-started", ts=0.2),
            ev("task-cancelled", ts=0.3),  # the worker lost its broker: delivered again
            received(ts=60.0, hostname="b@h"),
            ev("task-started", ts=60.1, hostname="b@h"),
            ev("task-failed", ts=61.1, hostname="b@h", exception="ValueError('x')"),
        ]
    )
    view = state(tracker)
    assert observations(view.runtime, (*KEY, "failed")) == (1, 1.0)
    assert "task-cancelled" not in view.task_counts  # known, but not a counter
    assert view.events_by_type["task-cancelled"] == 1


def test_task_replace_measures_the_replacement_from_its_own_send(tracker: Tracker) -> None:
    # The replacement is sent under the same id and its delivery may arrive before its send;
    # the replaced run ends with Ignore, which sends no event.
    tracker.handle_all(
        [
            sent(ts=0.0, name="app.a"),
            received(ts=0.1, name="app.a"),
            ev("task-started", ts=0.2),
            received(ts=5.1, name="app.b"),
            sent(ts=5.0, name="app.b"),
            ev("task-started", ts=5.2),
            ev("task-failed", ts=6.2, exception="ValueError('x')"),
        ]
    )
    view = state(tracker)
    assert view.task_counts["task-started"] == {("app.a", "q1"): 1, ("app.b", "q1"): 1}
    assert observations(view.runtime, ("app.b", "q1", "failed")) == (1, 1.0)
    assert observations(view.queue_wait, ("app.b", "q1")) == (1, 0.2)
    assert observations(view.latency, ("app.b", "q1")) == (1, 6.2)  # the caller's whole wait


def test_a_time_limit_under_acks_late_is_one_task_run_twice(tracker: Tracker) -> None:
    # As Celery 5.7 sends it: rejected (requeued) before failed, then delivered again.
    tb = "Traceback...\nbilliard.exceptions.TimeLimitExceeded: TimeLimitExceeded(1,)\n"
    tracker.handle_all(
        [
            sent(ts=0.0),
            received(ts=0.1),
            ev("task-started", ts=0.2),
            ev("task-rejected", ts=1.2, requeue=True),
            ev("task-failed", ts=1.21, exception="ExceptionWithTraceback()", traceback=tb),
            received(ts=2.0, hostname="b@h"),
            ev("task-started", ts=2.1, hostname="b@h"),
            ev("task-succeeded", ts=2.2, hostname="b@h", runtime=0.1),
        ]
    )
    view = state(tracker)
    assert view.task_counts["task-received"] == {KEY: 2}  # same queue, same record
    assert view.task_counts["task-succeeded"] == {KEY: 1}
    assert observations(view.runtime, (*KEY, "failed")) == (1, 1.01)
    assert observations(view.runtime, (*KEY, "succeeded")) == (1, 0.1)
    assert observations(view.latency, KEY) == (1, 1.21)  # once per task id: its first outcome
    assert view.tasks_tracked == 0


def test_a_retry_to_another_queue_labels_each_attempt_by_its_own_queue(tracker: Tracker) -> None:
    tracker.handle_all(
        [
            sent(ts=1.0),
            received(ts=1.1),
            sent(ts=1.3, retries=1, queue="slow"),  # overtakes attempt 0's start, as in prefork
            ev("task-started", ts=1.2),
            ev("task-retried", ts=1.31),
            received(ts=1.4, retries=1),
            ev("task-started", ts=1.5),
            ev("task-succeeded", ts=1.6, runtime=0.1),
        ]
    )
    view = state(tracker)
    for kind in ("task-sent", "task-received", "task-started"):
        assert view.task_counts[kind] == {KEY: 1, ("app.add", "slow"): 1}, kind
    assert view.task_counts["task-retried"] == {KEY: 1}
    assert observations(view.queue_wait, KEY) == (1, 0.2)
    assert observations(view.queue_wait, ("app.add", "slow")) == (1, 0.2)


def test_a_task_delivered_forever_costs_a_bounded_amount(tracker: Tracker) -> None:
    tracker.handle(sent(ts=0.0))
    for i in range(2_000):  # Reject(requeue=True) in a loop
        t = 1.0 + i
        tracker.handle_all(
            [
                received(ts=t),
                ev("task-started", ts=t + 0.1),
                ev("task-rejected", ts=t + 0.2, requeue=True),
            ]
        )
    record = tracker.tasks.inflight["t1"]
    assert len(record.deliveries) <= 8
    assert len(record.fingerprints) <= 64
    view = state(tracker)
    assert view.task_counts["task-received"] == {KEY: 2_000}
    assert observations(view.queue_wait, KEY)[0] == 2_000


def test_a_name_that_is_not_a_string_relabels_nothing(tracker: Tracker) -> None:
    tracker.handle_all([sent(), received(), ev("task-started", name=7), ev("task-succeeded")])
    assert counts(tracker, "task-started") == {KEY: 1}


def test_a_wait_that_can_never_be_measured_is_counted_when_its_task_is_evicted(
    clock: Clock,
) -> None:
    tracker = Tracker(Limits(max_tracked_tasks=1), clock=clock)
    tracker.handle_all([sent(uuid="a"), received(uuid="a", retries=1), ev("task-started", "a")])
    tracker.handle(sent(uuid="b"))  # evicts a, whose attempt 1 waited for its task-sent
    assert state(tracker).unmeasured == {("queue_wait", "evicted"): 1}
