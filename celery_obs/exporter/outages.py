"""Logging a failure that repeats every round (a probe, a broadcast) once, not every round.

A broker that is down fails the queue probe every `--queue-poll-interval` and the broadcasts
every `--enable-events-interval`; a warning each time buries everything else in the log. So a
failure is logged when it starts, again only for a reason not seen in this outage, and once
more when the operation works again. The failures are still counted, each one, in the metrics.
"""

from __future__ import annotations

import logging

#: Distinct reasons warned about in one outage; past that, failures are logged at debug only.
_MAX_REASONS = 10


class OutageLog:
    def __init__(self, log: logging.Logger, what: str) -> None:
        self._log = log
        self._what = what
        self._failures = 0  # in a row
        self._reasons: set[str] = set()  # those logged as warnings in this outage

    def failed(self, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        self._failures += 1
        if reason not in self._reasons and len(self._reasons) < _MAX_REASONS:
            self._reasons.add(reason)
            self._log.warning(
                "%s failed: %s (logged again for another reason, or when it recovers)",
                self._what,
                reason,
            )
        else:
            self._log.debug("%s failed again (%d in a row): %s", self._what, self._failures, reason)

    def succeeded(self) -> None:
        if self._failures:
            self._log.info("%s works again after %d failures", self._what, self._failures)
        self._failures = 0
        self._reasons.clear()
