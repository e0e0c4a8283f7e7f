"""What the shipper lost, and what the destination has been told about it.

Losses are kept as counts, never as lines in the queue: a report line queued with the records
would be dropped with them when the bounds that cost them are hit again. `LossReports` turns
the counts not yet reported into report records (`event.action` `log-records-dropped` or
`log-records-rejected`, the count in `labels`), which the shipper sends on their own; a count
counts as reported only once the destination took its record (`told`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

DROPPED = "log-records-dropped"
REJECTED = "log-records-rejected"
MESSAGES = {
    DROPPED: "log shipping dropped %d records (queue or spool full)",
    REJECTED: "the log sink refused %d records for good; latest: %s",
}


class LossReports:
    def __init__(
        self,
        logger_name: str,
        format_record: Callable[[logging.LogRecord], str],
        interval: float,
        clock: Callable[[], float],
    ) -> None:
        self.logger_name = logger_name
        self.format_record = format_record
        self.interval = interval
        self.clock = clock
        self.reported = {DROPPED: 0, REJECTED: 0}  # totals the destination has been told
        self._last = float("-inf")

    def due(self, now: bool = False) -> bool:
        """Whether to report (at most once per `interval`, unless `now`)."""
        if not now and self.clock() - self._last < self.interval:
            return False
        self._last = self.clock()
        return True

    def unreported(self, action: str, total: int) -> int:
        return total - self.reported[action]

    def told(self, action: str, total: int) -> None:
        self.reported[action] = total

    def line(self, action: str, count: int, detail: str = "") -> bytes:
        """A record about the shipping itself: `count` lines dropped or refused."""
        args = (count, detail) if action == REJECTED else (count,)
        record = logging.LogRecord(
            self.logger_name, logging.WARNING, __file__, 0, MESSAGES[action], args, None
        )
        record.ecs = {
            "event": {"action": action, "outcome": "failure"},
            "labels": {action.replace("-", "_"): count},
        }
        try:
            return self.format_record(record).encode()
        except Exception:  # no formatter: still say it
            return json.dumps({"message": record.getMessage()}).encode()
