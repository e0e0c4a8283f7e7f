"""The exporter's account of itself: what it consumed, skipped, dropped and could not measure.

Every place that drops or skips something counts it here, by a short reason, so a scrape says
what the exporter did with the stream (the `celery_exporter_*` metrics).
"""

from __future__ import annotations


def _bump(table: dict, key: object) -> None:
    table[key] = table.get(key, 0) + 1


class ExporterStats:
    def __init__(self) -> None:
        self.events_by_type: dict[str, int] = {}
        #: reason -> messages or events that could not be used at all.
        self.malformed: dict[str, int] = {}
        #: event type -> true redeliveries (same uuid, type, timestamp, hostname) not recounted.
        self.duplicates: dict[str, int] = {}
        #: histogram -> negative durations past the skew tolerance (clamped to 0, observed).
        self.negative_durations: dict[str, int] = {}
        #: (histogram, reason) -> durations not observed because they cannot be known.
        self.unmeasured: dict[tuple[str, str], int] = {}
        #: Unfinished tasks dropped from the full in-flight table.
        self.tasks_evicted = 0
        #: Down workers dropped from the full worker table to make room for a live one.
        self.workers_evicted = 0
        #: Events from workers beyond the worker table's bound, ignored.
        self.workers_overflow = 0
        #: Hostnames longer than a label may be, cut.
        self.hostnames_truncated = 0
        #: Wall time of the last event (0 before the first).
        self.last_event_at = 0.0

    def count_malformed(self, reason: str) -> None:
        _bump(self.malformed, reason)

    def count_duplicate(self, kind: str) -> None:
        _bump(self.duplicates, kind)

    def count_negative(self, metric: str) -> None:
        _bump(self.negative_durations, metric)

    def count_unmeasured(self, metric: str, reason: str) -> None:
        _bump(self.unmeasured, (metric, reason))
