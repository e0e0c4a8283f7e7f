"""Render the tracker's state as Prometheus text at scrape time.

The text is written straight from the tracker's tables, with each series' name-and-labels prefix
built once and cached: a scrape costs one pass over the state and a string join, not a Python
object per sample (prometheus_client's MetricFamily/generate_latest path took 85 ms and most of a
core at 50 task names). Each scrape first lets the tracker `tick()` (worker liveness, parked
events), then reads its typed view; down workers drop out without touching any series object,
and counters show only label sets that happened.
Nothing here talks to the broker: queue lengths come from the background probe's cache.

`CeleryCollector` adapts the same text to a prometheus_client registry for code that wants one.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from . import metrics as m
from .aggregates import Histogram, LabelKey
from .tracker import Tracker, TrackerView

if TYPE_CHECKING:
    from .consumer import BrokerStatus
    from .queues import QueueLengths

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Iterable[str]) -> str:
    return ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True))


def _float(value: float) -> str:
    """A float as the text format wants it: Python's repr, with Prometheus' spelling of Inf."""
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))  # 'nan' parses as NaN


def _number(value: float) -> str:
    return str(value) if type(value) is int else _float(value)


class Exposition:
    """Writes every metric of the catalogue, in catalogue order, as Prometheus text 0.0.4."""

    def __init__(
        self,
        tracker: Tracker,
        lock: threading.Lock,
        status: BrokerStatus,
        queue_lengths: QueueLengths,
        version: str,
    ) -> None:
        self.tracker = tracker
        self.lock = lock
        self.status = status
        self.queue_lengths = queue_lengths
        self.version = version
        self._headers = {
            spec.name: f"# HELP {spec.name} {spec.help}\n# TYPE {spec.name} {spec.type}\n"
            for spec in m.CATALOGUE
        }
        self._les = [_float(b) for b in tracker.metrics.buckets] + ["+Inf"]
        # (metric name, label values) -> the series' text up to its value; bounded by the
        # label limits, so it never outgrows the state it mirrors.
        self._prefixes: dict[str, dict[LabelKey, str]] = {}
        self._bucket_prefixes: dict[tuple[str, LabelKey], list[str]] = {}

    def render(self) -> bytes:
        out: list[str] = []
        with self.lock:
            self.tracker.tick()
            view = self.tracker.view()
            self._tasks(out, view)
            self._workers(out, view)
            self._exporter(out, view)
        self._queues(out)
        # Labels are cleaned where they enter (aggregates.clean_label); "replace" is the last
        # line of defence: one odd string must never cost every later scrape.
        return "".join(out).encode("utf-8", "replace")

    # -- series writers ---------------------------------------------------------------------

    def _prefix(self, spec: m.MetricSpec, key: LabelKey, suffix: str = "") -> str:
        name = spec.name + suffix
        cache = self._prefixes.setdefault(name, {})
        prefix = cache.get(key)
        if prefix is None:
            labels = _labels(spec.labels, key)
            prefix = cache[key] = f"{name}{{{labels}}} " if labels else f"{name} "
        return prefix

    def _series(
        self, out: list[str], spec: m.MetricSpec, values: Mapping, prune: bool = False
    ) -> None:
        out.append(self._headers[spec.name])
        prefix = self._prefix
        for key, value in values.items():
            out.append(f"{prefix(spec, key)}{_number(value)}\n")
        if prune:  # series that come and go (workers): forget the ones that went
            cache = self._prefixes.get(spec.name, {})
            for gone in cache.keys() - values.keys():
                del cache[gone]

    def _single(self, out: list[str], spec: m.MetricSpec, value: float) -> None:
        out.append(f"{self._headers[spec.name]}{spec.name} {_number(value)}\n")

    def _labelled(self, out: list[str], spec: m.MetricSpec, values: Mapping[str, int]) -> None:
        self._series(out, spec, {(label,): value for label, value in sorted(values.items())})

    def _histogram(
        self, out: list[str], spec: m.MetricSpec, table: Mapping[LabelKey, Histogram]
    ) -> None:
        out.append(self._headers[spec.name])
        for key, hist in table.items():
            buckets = self._bucket_prefixes.get((spec.name, key))
            if buckets is None:
                labels = _labels(spec.labels, key)
                sep = "," if labels else ""
                buckets = [f'{spec.name}_bucket{{{labels}{sep}le="{le}"}} ' for le in self._les]
                self._bucket_prefixes[(spec.name, key)] = buckets
            cumulative = 0
            for prefix, count in zip(buckets, hist.counts, strict=True):
                cumulative += count
                out.append(f"{prefix}{cumulative}\n")
            out.append(f"{self._prefix(spec, key, '_sum')}{_float(hist.sum)}\n")
            out.append(f"{self._prefix(spec, key, '_count')}{cumulative}\n")

    # -- families -----------------------------------------------------------------------------

    def _tasks(self, out: list[str], view: TrackerView) -> None:
        for kind, spec in m.TASK_COUNTERS.items():
            self._series(out, spec, view.task_counts[kind])
        self._histogram(out, m.TASK_RUNTIME, view.runtime)
        self._histogram(out, m.TASK_QUEUE_WAIT, view.queue_wait)
        self._histogram(out, m.TASK_LATENCY, view.latency)

    def _workers(self, out: list[str], view: TrackerView) -> None:
        views = view.workers
        series = self._series
        series(out, m.WORKER_UP, {(v.hostname,): int(v.up) for v in views}, prune=True)
        lost = {(v.hostname,): int(v.state == "lost") for v in views}
        series(out, m.WORKER_LOST, lost, prune=True)
        series(out, m.WORKER_TASKS_ACTIVE, {(v.hostname,): v.active for v in views}, prune=True)
        series(out, m.WORKER_TASKS_PROCESSED, {(v.hostname,): v.processed for v in views}, True)
        series(out, m.WORKER_LAST_HEARTBEAT, {(v.hostname,): v.last_seen for v in views}, True)

    def _exporter(self, out: list[str], view: TrackerView) -> None:
        status = self.status
        self._labelled(out, m.EXPORTER_EVENTS, view.events_by_type)
        self._labelled(out, m.EXPORTER_MALFORMED, view.malformed)
        self._labelled(out, m.EXPORTER_DUPLICATES, view.duplicates)
        self._single(out, m.EXPORTER_BROKER_CONNECTED, int(status.connected))
        self._single(out, m.EXPORTER_RECONNECTS, status.reconnects)
        self._single(out, m.EXPORTER_LAST_EVENT, view.last_event_at)
        self._single(out, m.EXPORTER_TASKS_TRACKED, view.tasks_tracked)
        self._single(out, m.EXPORTER_TASKS_EVICTED, view.tasks_evicted)
        self._single(out, m.EXPORTER_WORKERS_EVICTED, view.workers_evicted)
        self._labelled(out, m.EXPORTER_LABEL_OVERFLOW, view.label_overflows)
        self._labelled(out, m.EXPORTER_LABEL_TRUNCATED, view.label_truncations)
        self._labelled(out, m.EXPORTER_NEGATIVE_DURATIONS, view.negative_durations)
        self._series(out, m.EXPORTER_UNMEASURED, dict(sorted(view.unmeasured.items())))
        self._single(out, m.EXPORTER_BACKLOG_BYTES, status.backlog.backlog_bytes)
        self._single(out, m.EXPORTER_BACKLOG_FULL, status.backlog.full_waits)
        reader = {(status.reader,): 1} if status.reader else {}
        self._series(out, m.EXPORTER_EVENT_READER, reader, prune=True)
        self._series(out, m.EXPORTER_BUILD_INFO, {(self.version,): 1})

    def _queues(self, out: list[str]) -> None:
        lengths, errors = self.queue_lengths.snapshot()
        self._series(out, m.QUEUE_LENGTH, {(q,): n for q, n in sorted(lengths.items())})
        self._single(out, m.EXPORTER_QUEUE_PROBE_ERRORS, errors)


class CeleryCollector:
    """The exposition as a prometheus_client collector (parsed back from its own text).

    prometheus_client is imported only here: the exporter itself never needs its ~10 MB.
    """

    def __init__(self, exposition: Exposition) -> None:
        self.exposition = exposition

    def collect(self) -> Iterator[Any]:
        from prometheus_client.parser import text_string_to_metric_families

        yield from text_string_to_metric_families(self.exposition.render().decode())
