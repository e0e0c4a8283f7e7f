"""The delivery pump on its own: a queue, a scripted sink, a memory spool, an injected clock
and sleep. Backoff, order through failures, partial takes, loss reports and the close
deadline, without a thread or a real wait."""

from __future__ import annotations

import json
import logging
import threading

import pytest

from celery_obs.log_shipping.fallback import FallbackSpool
from celery_obs.log_shipping.linequeue import LineQueue
from celery_obs.log_shipping.losses import DROPPED, LossReports
from celery_obs.log_shipping.pump import DeliveryPump
from celery_obs.log_shipping.sinks import SinkError
from celery_obs.retry import Backoff


class ScriptedSink:
    """Fails the first `failures` sends (optionally taking part of the batch), then takes all."""

    def __init__(self, failures: int = 0, partial: int = 0) -> None:
        self.failures = failures
        self.partial = partial  # lines taken by each failing send
        self.lines: list[bytes] = []
        self.sends = 0
        self.during_failure = lambda: None

    def send(self, lines: list[bytes]) -> None:
        self.sends += 1
        if self.failures:
            self.failures -= 1
            self.during_failure()
            taken = lines[: self.partial]
            self.lines.extend(taken)
            raise SinkError("down", remaining=lines[len(taken) :] if taken else None)
        self.lines.extend(lines)

    def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def wait(self, seconds: float) -> None:
        """Waiting for lines: no batch came sooner, the flush interval passed."""
        self.now += seconds


def make(
    sink: ScriptedSink, clock: Clock, *, dropped: int = 0, cap: float = 30.0, batch: int = 2
) -> tuple[DeliveryPump, LineQueue]:
    queue = LineQueue(100, 1 << 20, batch)
    spool = FallbackSpool(None, 1 << 20)
    pump = DeliveryPump(
        queue,
        sink,
        lambda: spool,
        order=threading.Lock(),
        reports=LossReports("celery_obs.log_shipping", lambda r: r.getMessage(), 1.0, clock),
        dropped=lambda: dropped,
        backoff=Backoff(0.5, cap),
        clock=clock,
        wait=clock.wait,
        sleep=clock.sleep,
        batch_size=batch,
    )
    return pump, queue


def lines(*texts: str) -> list[bytes]:
    return [text.encode() for text in texts]


def test_a_failing_sink_is_retried_with_capped_backoff_and_nothing_is_lost(caplog) -> None:
    clock = Clock()
    sink = ScriptedSink(failures=5)
    pump, queue = make(sink, clock, cap=4.0)
    for line in lines("a", "b", "c"):
        queue.put(line)
    with caplog.at_level(logging.WARNING, "celery_obs.log_shipping"):
        pump.run(0.5, stopping=lambda: len(sink.lines) == 3)
    assert clock.slept == [0.5, 1.0, 2.0, 4.0, 4.0]  # doubled to the cap, on the fake clock
    assert sink.lines == lines("a", "b", "c")
    assert (pump.sent, pump.last_error) == (3, None)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2  # failing once per outage, then recovered
    assert said[0].startswith("log shipping failing (down)")
    assert said[1] == "log shipping recovered (last error: SinkError: down)"


def test_order_holds_when_lines_arrive_during_an_outage_and_the_sink_takes_part() -> None:
    clock = Clock()
    sink = ScriptedSink(failures=2, partial=1)
    pump, queue = make(sink, clock)
    arriving = iter(lines("c", "d"))
    sink.during_failure = lambda: queue.put(next(arriving))
    for line in lines("a", "b"):
        queue.put(line)
    pump.run(0.5, stopping=lambda: len(sink.lines) == 4)
    assert sink.lines == lines("a", "b", "c", "d")
    assert clock.slept == [0.5, 1.0]


def test_a_loss_report_the_sink_did_not_take_is_sent_again() -> None:
    clock = Clock()
    sink = ScriptedSink(failures=1)  # the first send is the report: refused
    pump, queue = make(sink, clock, dropped=7)
    queue.put(b"a")
    pump.run(0.5, stopping=lambda: len(sink.lines) == 2)
    assert sink.lines == [b"a", b"log shipping dropped 7 records (queue or spool full)"]
    assert pump.reports.reported[DROPPED] == 7  # told only once it was taken
    assert clock.now - 1000.0 >= 1.0  # reports wait out their interval between tries


def test_closing_past_the_deadline_leaves_the_rest_in_the_spool_without_waiting() -> None:
    clock = Clock()
    sink = ScriptedSink(failures=100)
    pump, queue = make(sink, clock)
    for line in lines("a", "b", "c"):
        queue.put(line)
    pump.close_deadline = clock.now - 1  # closing, and out of time
    pump.run(0.5, stopping=lambda: True)
    assert (sink.sends, clock.slept, len(queue)) == (0, [], 0)
    assert pump.spool is not None
    kept = []
    while (batch := pump.spool.peek()) is not None:
        kept += batch
        pump.spool.pop()
    assert kept == lines("a", "b", "c")  # for the next start, in order


@pytest.mark.parametrize("failing", ["open", "sink"])
def test_a_failure_anywhere_costs_a_backoff_not_the_pump(failing: str) -> None:
    clock = Clock()
    sink = ScriptedSink(failures=1 if failing == "sink" else 0)
    pump, queue = make(sink, clock)
    if failing == "open":
        spool = pump.open_spool()
        attempts = iter([OSError("disk gone"), spool])

        def flaky() -> FallbackSpool:
            outcome = next(attempts)
            if isinstance(outcome, Exception):
                raise outcome
            return outcome

        pump.open_spool = flaky
    queue.put(b"a")
    pump.run(0.5, stopping=lambda: sink.lines == [b"a"])
    assert sink.lines == [b"a"]
    assert clock.slept == ([0.5] if failing == "sink" else [])
    assert json.dumps(pump.last_error) == "null"
