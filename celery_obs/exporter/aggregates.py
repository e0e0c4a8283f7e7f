"""What the task counters and histograms hold: per-label counts and per-bucket observations.

This is the state a scrape renders. Label values pass through bounded `LabelLimiter`s, so the
number of series is bounded by configuration however many names, queues or exception classes
the cluster produces; what overflowed is counted.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable

from .metrics import OVERFLOW_LABEL, UNKNOWN_LABEL, BucketLayout
from .native import NativeBuckets
from .vocabulary import TASK_EVENTS

LabelKey = tuple[str, ...]


#: Longest label value served, in characters; longer ones are cut (and counted). Task names,
#: queues, exception classes and hostnames are far shorter: only a hostile or broken sender
#: reaches it, and without it 14 MB of events made a 156 MB scrape.
MAX_LABEL_LENGTH = 256


def clean_label(value: str) -> tuple[str, bool]:
    """`value` as a label can carry it: cut to MAX_LABEL_LENGTH, and encodable as UTF-8 (a lone
    surrogate from a JSON `\\ud800` made every later scrape fail). Returns (label, was_cut)."""
    cut = len(value) > MAX_LABEL_LENGTH
    if cut:
        value = value[:MAX_LABEL_LENGTH]
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            value = value.encode("utf-8", "replace").decode("utf-8")
    return value, cut


class LabelLimiter:
    """Pass through the first `limit` distinct values, map the rest to `other` and count them.

    Values are cleaned first (`clean_label`); cuts are counted in `truncated`.
    """

    __slots__ = ("distinct", "limit", "overflow", "truncated", "values")

    def __init__(self, limit: int, preset: Iterable[str] = ()) -> None:
        self.limit = limit
        # value as sent -> its label, the first instance seen: records then share one string
        # per name instead of each holding the copy its event was decoded into (~70 bytes per
        # tracked task). Values that had to be cut are not kept as keys (they can be huge).
        self.values: dict[str, str] = {v: v for v in preset}
        self.distinct = len(self.values)
        self.overflow = 0
        self.truncated = 0

    def __call__(self, value: object) -> str:
        if not isinstance(value, str) or not value:
            return UNKNOWN_LABEL
        known = self.values.get(value)
        if known is not None:
            return known
        label, cut = clean_label(value)
        if cut:
            self.truncated += 1
        known = self.values.get(label)
        if known is None:
            if self.distinct >= self.limit:
                self.overflow += 1
                return OVERFLOW_LABEL
            known = self.values[label] = label
            self.distinct += 1
        if not cut:
            self.values[value] = known
        return known


#: (task id, value, Unix time): the last observation of a bucket, served as its exemplar.
Exemplar = tuple[str, float, float]

#: Longer task ids get no exemplar: OpenMetrics allows 128 characters for an exemplar's labels,
#: and Celery's ids are 36. Only an id chosen by hand (apply_async(task_id=...)) is longer.
MAX_EXEMPLAR_ID = 100


class Histogram:
    """Per-bucket (not cumulative) counts plus sum; the collector accumulates at scrape time.
    Native (exponential) buckets of the same observations are kept beside them.

    Each bucket also keeps its latest observation's task id (its exemplar): the way from a slow
    bucket on a dashboard to that one task's logs.
    """

    __slots__ = ("counts", "exemplars", "native", "sum")

    def __init__(self, nbuckets: int) -> None:
        self.counts = [0] * (nbuckets + 1)  # the last slot is +Inf
        self.sum = 0.0
        self.exemplars: list[Exemplar | None] | None = None  # made with the first exemplar
        #: The same observations at exponential resolution, for the protobuf exposition.
        self.native = NativeBuckets()


class TaskMetrics:
    """Task counters by (event type, labels) and the three duration histograms."""

    def __init__(
        self,
        buckets: BucketLayout,
        max_task_names: int,
        max_queues: int,
        max_exceptions: int,
    ) -> None:
        self.buckets = buckets
        self.task_names = LabelLimiter(max_task_names)
        self.queues = LabelLimiter(max_queues)
        self.exceptions = LabelLimiter(max_exceptions)
        self.counts: dict[str, dict[LabelKey, int]] = {
            kind: {} for kind, t in TASK_EVENTS.items() if t.counted
        }
        #: event type -> task name -> Unix time of its latest such event (dead-man's switches).
        self.last_at: dict[str, dict[str, float]] = {
            "task-sent": {},
            "task-succeeded": {},
            "task-failed": {},
        }
        self.runtime: dict[LabelKey, Histogram] = {}
        self.queue_wait: dict[LabelKey, Histogram] = {}
        self.latency: dict[LabelKey, Histogram] = {}
        #: histogram -> (its table, its bounds)
        self._histograms = {
            name: (getattr(self, name), buckets.of(name))
            for name in ("runtime", "queue_wait", "latency")
        }

    def count(self, kind: str, key: LabelKey) -> None:
        counts = self.counts[kind]
        counts[key] = counts.get(key, 0) + 1

    def observe(
        self,
        histogram: str,
        key: LabelKey,
        value: float,
        task_id: str = "",
        at: float = 0.0,
    ) -> bool:
        """Add one observation to `histogram` (runtime, queue_wait or latency) of task
        `task_id`, made at Unix time `at` (the bucket's exemplar); False (nothing added) if the
        value is not a finite number."""
        if not math.isfinite(value):
            return False
        table, bounds = self._histograms[histogram]
        hist = table.get(key)
        if hist is None:
            hist = table[key] = Histogram(len(bounds))
        bucket = bisect_left(bounds, value)
        hist.counts[bucket] += 1
        hist.sum += value
        hist.native.observe(value)
        if task_id and len(task_id) <= MAX_EXEMPLAR_ID:
            exemplars = hist.exemplars
            if exemplars is None:
                exemplars = hist.exemplars = [None] * len(hist.counts)
            exemplars[bucket] = (task_id, value, at)
        return True

    def label_overflows(self) -> dict[str, int]:
        return {
            "name": self.task_names.overflow,
            "exception": self.exceptions.overflow,
            "queue_name": self.queues.overflow,
        }

    def label_truncations(self) -> dict[str, int]:
        return {
            "name": self.task_names.truncated,
            "exception": self.exceptions.truncated,
            "queue_name": self.queues.truncated,
        }
