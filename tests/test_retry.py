"""The shared retry arithmetic, on an injected clock: no test waits in real time."""

from __future__ import annotations

import pytest

from celery_obs.retry import Backoff, Deadline


def test_backoff_doubles_to_its_cap_and_starts_over_after_a_success() -> None:
    backoff = Backoff(0.5, 5.0)
    assert [backoff.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    backoff.reset()
    assert [backoff.next() for _ in range(2)] == [0.5, 1.0]


@pytest.mark.parametrize(("start", "cap"), [(0, 1), (-1, 1), (2, 1)])
def test_a_backoff_that_could_not_wait_is_an_error(start: float, cap: float) -> None:
    with pytest.raises(ValueError, match="0 < start <= cap"):
        Backoff(start, cap)


def test_a_deadline_counts_down_on_its_clock() -> None:
    now = [100.0]
    deadline = Deadline(3.0, lambda: now[0])
    assert (deadline.passed(), deadline.remaining(), deadline.pause(1.0)) == (False, 3.0, 1.0)
    now[0] = 102.5
    assert (deadline.passed(), deadline.remaining(), deadline.pause(1.0)) == (False, 0.5, 0.5)
    now[0] = 103.0
    assert (deadline.passed(), deadline.remaining(), deadline.pause(1.0)) == (True, 0.0, 0.0)
    assert Deadline(-5, lambda: now[0]).passed()  # no wait asked: passed at once
