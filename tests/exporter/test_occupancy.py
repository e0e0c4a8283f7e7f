"""Fast layer: what is running and waiting now, when each task name last ran, worker facts and
exemplars, from the tracker fed event dicts with an injected clock. Exact numbers throughout."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from celery_obs.exporter.config import Limits
from celery_obs.exporter.metrics import RUNTIME_BUCKETS
from celery_obs.exporter.tracker import Tracker, TrackerView

from test_tracker import KEY, WORKER, Clock, ev, received, sent

OTHER = "w2@h"


@pytest.fixture
def clock() -> Clock:
    return Clock(1_000.0)


@pytest.fixture
def tracker(clock: Clock) -> Tracker:
    return Tracker(Limits(worker_timeout=10, worker_retention=600), clock=clock)


def scrape(tracker: Tracker) -> TrackerView:
    tracker.tick()
    return tracker.view()


def running(tracker: Tracker) -> tuple[dict, dict]:
    """(count, oldest age) per (name, queue) of the tasks running now."""
    view = scrape(tracker)
    return view.running.counts, {k: view.now - s for k, s in view.running.oldest.items()}


def waiting(tracker: Tracker) -> tuple[dict, dict]:
    view = scrape(tracker)
    return view.waiting.counts, {k: view.now - s for k, s in view.waiting.oldest.items()}


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat()


def heartbeat(hostname: str = WORKER, **fields: object) -> dict:
    return {"type": "worker-heartbeat", "hostname": hostname, **fields}


# -- running ----------------------------------------------------------------------------------


def test_a_running_task_ages_between_events_then_disappears(tracker: Tracker, clock: Clock) -> None:
    tracker.handle_all([sent(ts=990.0), received(ts=991.0), ev("task-started", ts=992.0)])
    assert running(tracker) == ({KEY: 1}, {KEY: 8.0})
    clock.advance(3_600)  # no event for an hour: the age still grows
    assert running(tracker) == ({KEY: 1}, {KEY: 3_608.0})
    tracker.handle(ev("task-succeeded", ts=4_600.0, runtime=3_608.0))
    assert running(tracker) == ({}, {})
    assert waiting(tracker) == ({}, {})


def test_the_oldest_of_several_is_reported_per_name_and_queue(
    tracker: Tracker, clock: Clock
) -> None:
    for i, started in enumerate((995.0, 980.0, 999.0)):
        uuid = f"t{i}"
        tracker.handle_all(
            [sent(uuid, ts=970.0), received(uuid, ts=970.0), ev("task-started", uuid, started)]
        )
    tracker.handle_all(
        [
            sent("other", ts=970.0, name="app.slow", queue="q2"),
            received("other", ts=970.0, name="app.slow"),
            ev("task-started", "other", 990.0),
        ]
    )
    assert running(tracker) == (
        {KEY: 3, ("app.slow", "q2"): 1},
        {KEY: 20.0, ("app.slow", "q2"): 10.0},
    )
    tracker.handle(ev("task-succeeded", "t1", 1_000.0, runtime=20.0))
    assert running(tracker) == (
        {KEY: 2, ("app.slow", "q2"): 1},
        {KEY: 5.0, ("app.slow", "q2"): 10.0},
    )


def test_an_age_is_never_negative(tracker: Tracker) -> None:
    """A worker clock ahead of ours starts the task "in the future"."""
    tracker.handle_all([sent(ts=1_000.0), received(ts=1_005.0), ev("task-started", ts=1_010.0)])
    view = scrape(tracker)
    assert view.running.oldest[KEY] - view.now == 10.0  # raw; the collector clamps to 0


def test_a_retry_leaves_running_and_its_countdown_is_not_waiting(
    tracker: Tracker, clock: Clock
) -> None:
    tracker.handle_all([sent(ts=999.0), received(ts=999.0), ev("task-started", ts=999.5)])
    assert running(tracker)[0] == {KEY: 1}
    # The retry: a new attempt, sent with a 60 s countdown, received at once and held.
    tracker.handle_all(
        [
            sent(ts=1_000.0, retries=1, eta=iso(1_060.0)),
            ev("task-retried", ts=1_000.0),
            received(ts=1_000.1, retries=1, eta=iso(1_060.0)),
        ]
    )
    assert running(tracker) == ({}, {})
    assert waiting(tracker) == ({}, {})
    assert scrape(tracker).reserved == {}
    clock.advance(60)  # the countdown is over: now it waits for a free process
    assert waiting(tracker) == ({KEY: 1}, {KEY: 0.0})
    clock.advance(5)
    assert waiting(tracker) == ({KEY: 1}, {KEY: 5.0})
    assert scrape(tracker).reserved == {WORKER: 1}
    tracker.handle(ev("task-started", ts=1_065.0))
    assert waiting(tracker) == ({}, {})
    assert running(tracker) == ({KEY: 1}, {KEY: 0.0})
    tracker.handle(ev("task-succeeded", ts=1_066.0, runtime=1.0))
    assert running(tracker) == ({}, {})


# -- waiting ----------------------------------------------------------------------------------


def test_prefetched_tasks_wait_until_started(tracker: Tracker, clock: Clock) -> None:
    tracker.handle_all([sent("a", ts=990.0), received("a", ts=990.0), ev("task-started", "a", 990)])
    for uuid, ts in (("b", 992.0), ("c", 995.0)):
        tracker.handle_all([sent(uuid, ts=ts), received(uuid, ts=ts)])
    assert waiting(tracker) == ({KEY: 2}, {KEY: 8.0})
    assert scrape(tracker).reserved == {WORKER: 2}
    tracker.handle_all([ev("task-succeeded", "a", 1_000.0, runtime=10.0), ev("task-started", "b")])
    assert waiting(tracker) == ({KEY: 1}, {KEY: 5.0})
    assert running(tracker)[0] == {KEY: 1}


def test_an_eta_in_the_past_waits_from_its_receipt(tracker: Tracker) -> None:
    tracker.handle_all([sent(ts=950.0, eta=iso(900.0)), received(ts=950.0, eta=iso(900.0))])
    assert waiting(tracker) == ({KEY: 1}, {KEY: 50.0})


def test_a_task_revoked_while_held_for_its_eta_never_waits(tracker: Tracker, clock: Clock) -> None:
    tracker.handle_all([sent(ts=1_000.0, eta=iso(1_100.0)), received(ts=1_000.0, eta=iso(1_100.0))])
    tracker.handle(ev("task-revoked", ts=1_001.0))
    clock.advance(200)
    assert waiting(tracker) == ({}, {})
    assert tracker.tasks.occupancy.scheduled == 0


def test_revoked_and_rejected_tasks_stop_waiting(tracker: Tracker) -> None:
    tracker.handle_all([sent("a"), received("a"), sent("b"), received("b")])
    assert waiting(tracker)[0] == {KEY: 2}
    tracker.handle_all([ev("task-revoked", "a"), ev("task-rejected", "b", requeue=False)])
    assert waiting(tracker) == ({}, {})


def test_a_redelivery_replaces_the_earlier_delivery(tracker: Tracker) -> None:
    """acks_late: the same attempt delivered to another worker; the first will never end."""
    tracker.handle_all([sent(), received(), ev("task-started")])
    tracker.handle(received(ts=1_001.0, hostname=OTHER))
    assert running(tracker)[0] == {}
    assert waiting(tracker)[0] == {KEY: 1}
    assert scrape(tracker).reserved == {OTHER: 1}


def test_an_outcome_before_its_start_leaves_nothing_running(tracker: Tracker) -> None:
    """The pool child's task-succeeded can overtake the main process's task-started."""
    tracker.handle_all(
        [sent(), received(), ev("task-succeeded", ts=1_001.0, runtime=0.5), ev("task-started")]
    )
    assert running(tracker) == ({}, {})
    assert waiting(tracker) == ({}, {})


def test_many_eta_tasks_revoked_leave_a_bounded_heap(tracker: Tracker, clock: Clock) -> None:
    for i in range(5_000):
        uuid = f"t{i}"
        eta = iso(100_000.0)
        tracker.handle_all([sent(uuid, eta=eta), received(uuid, eta=eta), ev("task-revoked", uuid)])
    scrape(tracker)
    occupancy = tracker.tasks.occupancy
    assert occupancy.scheduled == 0
    assert len(occupancy._scheduled) <= 1_024


# -- workers going away -----------------------------------------------------------------------


def test_a_lost_workers_tasks_stop_running_and_are_counted(tracker: Tracker, clock: Clock) -> None:
    tracker.handle(heartbeat())
    tracker.handle_all([sent("a"), received("a"), ev("task-started", "a")])
    tracker.handle_all([sent("b"), received("b")])  # prefetched behind it
    tracker.handle_all(
        [
            sent("c", name="app.other"),
            received("c", name="app.other", hostname=OTHER),
            heartbeat(OTHER),
        ]
    )
    clock.advance(8)
    tracker.handle(heartbeat(OTHER))
    clock.advance(3)  # WORKER silent for 11 s: lost
    view = scrape(tracker)
    assert view.running.counts == {}
    assert view.waiting.counts == {("app.other", "q1"): 1}
    assert view.worker_lost == {KEY: 2}
    # Counted once, however many scrapes follow.
    clock.advance(1)
    assert scrape(tracker).worker_lost == {KEY: 2}
    # It was only a network partition: the worker finishes its task; nothing goes negative.
    tracker.handle_all([heartbeat(), ev("task-succeeded", "a", runtime=1.0)])
    tracker.handle(ev("task-started", "b"))  # and starts the next: it runs again
    assert running(tracker)[0] == {KEY: 1}
    assert scrape(tracker).worker_lost == {KEY: 2}


def test_a_warm_shutdown_hands_back_prefetched_tasks_without_counting_a_loss(
    tracker: Tracker, clock: Clock
) -> None:
    tracker.handle(heartbeat())
    tracker.handle_all([sent("a"), received("a"), ev("task-started", "a")])
    tracker.handle_all([sent("b"), received("b")])
    tracker.handle({"type": "worker-offline", "hostname": WORKER})
    assert waiting(tracker) == ({}, {})
    # The running task finishes (or its end never comes): past the worker timeout with the
    # worker still offline, it is taken out too. No loss is counted: it shut down warmly.
    assert running(tracker)[0] == {KEY: 1}
    clock.advance(11)
    assert running(tracker) == ({}, {})
    assert scrape(tracker).worker_lost == {}
    # Late events of the old process place nothing.
    tracker.handle_all([ev("task-started", "b"), sent("c"), received("c")])
    assert (running(tracker)[0], waiting(tracker)[0]) == ({}, {})


def test_a_consumer_restart_keeps_running_tasks(tracker: Tracker, clock: Clock) -> None:
    """A broker hiccup: Celery's consumer restarts (worker-offline, worker-online) while the
    pool keeps running its tasks; prefetched messages went back to the broker."""
    tracker.handle(heartbeat())
    tracker.handle_all([sent("a"), received("a"), ev("task-started", "a")])
    tracker.handle_all([sent("b"), received("b")])
    tracker.handle({"type": "worker-offline", "hostname": WORKER})
    clock.advance(2)
    tracker.handle({"type": "worker-online", "hostname": WORKER})
    clock.advance(20)
    tracker.handle(heartbeat(active=1))
    assert running(tracker)[0] == {KEY: 1}
    assert waiting(tracker)[0] == {}
    assert scrape(tracker).worker_lost == {}
    tracker.handle_all([received("b", ts=1_022.0), ev("task-started", "b", 1_022.0)])
    assert running(tracker)[0] == {KEY: 2}


def test_an_idle_heartbeat_takes_out_what_never_said_it_ended(tracker: Tracker) -> None:
    tracker.handle_all([sent("a"), received("a"), ev("task-started", "a", 1_000.0)])
    tracker.handle_all([sent("b"), received("b"), ev("task-started", "b", 1_005.0)])
    tracker.handle(heartbeat(active=1, timestamp=1_004.0))  # busy: nothing changes
    assert running(tracker)[0] == {KEY: 2}
    # Idle at 1004 by its own clock: "a" (started at 1000) is not running, whatever we missed;
    # "b" started after that heartbeat was sent.
    tracker.handle(heartbeat(active=0, timestamp=1_004.0))
    assert running(tracker)[0] == {KEY: 1}
    assert next(iter(tracker.tasks.occupancy.running)).started == 1_005.0
    for active in (False, None, "0", -1):  # not a count of zero
        tracker.handle(heartbeat(active=active, timestamp=1_010.0))
    assert running(tracker)[0] == {KEY: 1}


def test_a_requeued_reject_stops_running(tracker: Tracker) -> None:
    tracker.handle_all([sent(), received(), ev("task-started")])
    tracker.handle(ev("task-rejected", ts=1_001.0, requeue=True))
    assert running(tracker) == ({}, {})
    tracker.handle(received(ts=1_002.0, hostname=OTHER))  # delivered again, elsewhere
    assert waiting(tracker)[0] == {KEY: 1}


def test_a_lost_worker_forgotten_before_any_scrape_still_gives_up_its_tasks(clock: Clock) -> None:
    """No scrape between the worker's death and the end of its retention (Prometheus down)."""
    tracker = Tracker(Limits(worker_timeout=10, worker_retention=60), clock=clock)
    tracker.handle(heartbeat())
    tracker.handle_all([sent(), received(), ev("task-started")])
    clock.advance(1_000)
    view = scrape(tracker)
    assert (view.running.counts, view.worker_lost, view.workers) == ({}, {KEY: 1}, [])


def test_a_lost_worker_evicted_for_a_new_one_gives_up_its_tasks(clock: Clock) -> None:
    tracker = Tracker(Limits(max_workers=1, worker_timeout=10), clock=clock)
    tracker.handle(heartbeat())
    tracker.handle_all([sent(), received(), ev("task-started")])
    clock.advance(20)
    tracker.handle(heartbeat(OTHER))  # the table is full: the dead worker makes room
    view = scrape(tracker)
    assert (view.running.counts, view.worker_lost, view.workers_evicted) == ({}, {KEY: 1}, 1)


def test_while_the_stream_is_stopped_no_worker_is_lost(tracker: Tracker, clock: Clock) -> None:
    tracker.handle(heartbeat())
    tracker.handle_all([sent(), received(), ev("task-started")])
    tracker.stream_stopped()  # the broker connection dropped for 30 s
    clock.advance(30)
    assert [w.state for w in scrape(tracker).workers] == ["online"]
    tracker.stream_resumed()
    clock.advance(5)  # a heartbeat is due within the timeout after the stream is back
    assert [w.state for w in scrape(tracker).workers] == ["online"]
    assert running(tracker)[0] == {KEY: 1}
    clock.advance(6)  # and none came: lost now
    assert [w.state for w in scrape(tracker).workers] == ["lost"]
    assert scrape(tracker).worker_lost == {KEY: 1}


@pytest.mark.parametrize("hostname", [["a", "list"], {"a": 1}, 7, None])
def test_an_unusable_hostname_costs_only_its_event(tracker: Tracker, hostname) -> None:
    tracker.handle_all([sent(), received(hostname=hostname), ev("task-started", hostname=hostname)])
    tracker.handle(heartbeat())
    view = scrape(tracker)  # must not raise
    assert view.running.counts == {KEY: 1}
    tracker.handle(ev("task-succeeded", hostname=hostname, runtime=1.0))
    assert running(tracker) == ({}, {})


def test_a_hostname_longer_than_a_label_is_matched_as_cut(tracker: Tracker, clock: Clock) -> None:
    host = "celery@" + "h" * 253  # a maximal FQDN: 260 characters
    tracker.handle(heartbeat(host))
    tracker.handle_all([sent("a"), received("a", hostname=host)])
    tracker.handle_all(
        [sent("b"), received("b", hostname=host), ev("task-started", "b", hostname=host)]
    )
    assert scrape(tracker).reserved == {host[:256]: 1}
    clock.advance(11)
    view = scrape(tracker)
    assert (view.running.counts, view.waiting.counts, view.worker_lost) == ({}, {}, {KEY: 2})


def test_a_restart_without_goodbye_loses_what_the_worker_held(tracker: Tracker) -> None:
    """Killed and started again within the worker timeout: only its worker-online says so."""
    tracker.handle({"type": "worker-online", "hostname": WORKER})
    tracker.handle_all([sent(), received(), ev("task-started")])
    tracker.handle({"type": "worker-online", "hostname": WORKER})
    assert running(tracker) == ({}, {})
    assert scrape(tracker).worker_lost == {KEY: 1}


def test_evicted_tasks_stop_counting(clock: Clock) -> None:
    tracker = Tracker(Limits(max_tracked_tasks=2), clock=clock)
    for uuid in ("a", "b", "c"):
        tracker.handle_all([sent(uuid), received(uuid), ev("task-started", uuid)])
    view = scrape(tracker)
    assert view.running.counts == {KEY: 2}
    assert view.tasks_evicted == 1


# -- when each task name last ran -------------------------------------------------------------


def test_last_sent_succeeded_and_failed_per_name(tracker: Tracker, clock: Clock) -> None:
    tracker.handle_all(
        [
            sent("a", ts=900.0),
            received("a", ts=900.0),
            ev("task-started", "a", 901.0),
            ev("task-succeeded", "a", 950.0, runtime=49.0),
            sent("b", ts=960.0),
            received("b", ts=960.0),
            ev("task-started", "b", 961.0),
            ev("task-failed", "b", 970.0, exception="ValueError('x')"),
        ]
    )
    last = scrape(tracker).last_at
    assert last["task-sent"] == {"app.add": 960.0}
    assert last["task-succeeded"] == {"app.add": 950.0}
    assert last["task-failed"] == {"app.add": 970.0}
    # A late event of an older run does not move it back; a clock ahead of ours is ours.
    tracker.handle_all(
        [
            sent("old", ts=100.0),
            sent("future", ts=5_000.0),
            received("future", ts=5_000.0),
            ev("task-started", "future", 5_000.0),
            ev("task-succeeded", "future", 5_001.0, runtime=1.0),
        ]
    )
    last = scrape(tracker).last_at
    assert last["task-sent"] == {"app.add": 1_000.0}
    assert last["task-succeeded"] == {"app.add": 1_000.0}


def test_an_event_without_a_time_is_stamped_with_ours(tracker: Tracker) -> None:
    tracker.handle(sent(ts=None))  # type: ignore[arg-type]
    assert scrape(tracker).last_at["task-sent"] == {"app.add": 1_000.0}


# -- worker facts -----------------------------------------------------------------------------


def test_heartbeats_say_what_a_worker_runs_and_its_load(tracker: Tracker, clock: Clock) -> None:
    tracker.handle(
        heartbeat(
            loadavg=[0.5, 0.25, 0.1],
            sw_ident="py-celery",
            sw_ver="5.5.3",
            sw_sys="Linux",
            processed=7,
        )
    )
    (worker,) = scrape(tracker).workers
    assert (worker.software, worker.load, worker.processed) == (
        ("py-celery", "5.5.3", "Linux"),
        (0.5, 0.25, 0.1),
        7,
    )
    # Nonsense is ignored, the last good value kept.
    for loadavg in ([1, 2], ["a", 1, 1], [-1.0, 0, 0], [float("nan"), 0, 0], "1 2 3", None):
        tracker.handle(heartbeat(loadavg=loadavg, sw_ver=["5"]))
    (worker,) = scrape(tracker).workers
    assert worker.load == (0.5, 0.25, 0.1)
    assert worker.software == ("py-celery", "5.5.3", "Linux")
    # A sender that names only some of them leaves the rest unknown.
    tracker.handle(heartbeat(sw_ver="5.6.0"))
    (worker,) = scrape(tracker).workers
    assert worker.software == ("unknown", "5.6.0", "unknown")
    clock.advance(11)  # lost: its load is no longer known
    (worker,) = scrape(tracker).workers
    assert (worker.state, worker.load) == ("lost", None)


# -- exemplars --------------------------------------------------------------------------------


def test_each_bucket_keeps_its_latest_task_id(tracker: Tracker) -> None:
    for uuid, runtime in (("fast-1", 0.02), ("fast-2", 0.03), ("slow", 40.0)):
        tracker.handle_all(
            [
                sent(uuid, ts=900.0),
                received(uuid, ts=900.0),
                ev("task-started", uuid, 901.0),
                ev("task-succeeded", uuid, 950.0, runtime=runtime),
            ]
        )
    hist = scrape(tracker).runtime[(*KEY, "succeeded")]
    assert hist.exemplars is not None
    exemplars = {
        RUNTIME_BUCKETS[i] if i < len(RUNTIME_BUCKETS) else "+Inf": e
        for i, e in enumerate(hist.exemplars)
        if e is not None
    }
    assert exemplars == {0.05: ("fast-2", 0.03, 950.0), 300.0: ("slow", 40.0, 950.0)}
    latency = scrape(tracker).latency[KEY]
    assert [e for e in latency.exemplars or () if e] == [("slow", 50.0, 950.0)]


def test_a_task_id_too_long_for_an_exemplar_is_still_observed(tracker: Tracker) -> None:
    uuid = "x" * 101
    tracker.handle_all(
        [
            sent(uuid),
            received(uuid),
            ev("task-started", uuid),
            ev("task-succeeded", uuid, runtime=1),
        ]
    )
    hist = scrape(tracker).runtime[(*KEY, "succeeded")]
    assert (sum(hist.counts), hist.exemplars) == (1, None)
