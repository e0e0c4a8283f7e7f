"""Render the tracker's state as Prometheus metric families at scrape time.

A custom collector instead of prometheus_client child metrics: worker liveness and ages are
derived at scrape time, down workers drop out without poking private fields, counters never get
zero-filled label sets, and a scrape costs one pass over the state instead of one object per series.
Nothing here talks to the broker: queue lengths come from the background probe's cache.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import metrics as m
from .tracker import Histogram, LabelKey, Tracker

if TYPE_CHECKING:
    from .consumer import BrokerStatus
    from .queues import QueueLengths


def _family(spec: m.MetricSpec) -> CounterMetricFamily | GaugeMetricFamily:
    if spec.type == "counter":
        return CounterMetricFamily(spec.family, spec.help, labels=spec.labels)
    assert spec.type == "gauge", spec
    return GaugeMetricFamily(spec.family, spec.help, labels=spec.labels)


class CeleryCollector(Collector):
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
        self._bucket_labels = [floatToGoString(b) for b in tracker.buckets] + ["+Inf"]

    def describe(self) -> Iterator[Metric]:
        # Describing without collecting keeps registration cheap and side-effect free.
        for spec in m.CATALOGUE:
            if spec.type == "histogram":
                yield HistogramMetricFamily(spec.family, spec.help, labels=spec.labels)
            else:
                yield _family(spec)

    def collect(self) -> Iterator[Metric]:
        with self.lock:
            families = list(self._task_families()) + list(self._worker_families())
            families += list(self._self_families())
        families += self._queue_families()
        return iter(families)

    def _task_families(self) -> Iterator[Metric]:
        tracker = self.tracker
        for kind, spec in m.TASK_COUNTERS.items():
            family = _family(spec)
            for key, value in tracker.task_counts[kind].items():
                family.add_metric(key, value)
            yield family
        yield self._histogram(m.TASK_RUNTIME, tracker.runtime)
        yield self._histogram(m.TASK_QUEUE_WAIT, tracker.queue_wait)
        yield self._histogram(m.TASK_LATENCY, tracker.latency)

    def _histogram(self, spec: m.MetricSpec, table: dict[LabelKey, Histogram]) -> Metric:
        family = HistogramMetricFamily(spec.family, spec.help, labels=spec.labels)
        labels = self._bucket_labels
        for key, hist in table.items():
            cumulative, buckets = 0, []
            for le, count in zip(labels, hist.counts, strict=True):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric(list(key), buckets, hist.sum)
        return family

    def _worker_families(self) -> Iterator[Metric]:
        up, active = _family(m.WORKER_UP), _family(m.WORKER_TASKS_ACTIVE)
        processed, heartbeat = _family(m.WORKER_TASKS_PROCESSED), _family(m.WORKER_LAST_HEARTBEAT)
        for view in self.tracker.worker_views():
            key = (view.hostname,)
            up.add_metric(key, 1 if view.up else 0)
            active.add_metric(key, view.active)
            processed.add_metric(key, view.processed)
            heartbeat.add_metric(key, view.last_seen)
        yield from (up, active, processed, heartbeat)

    def _self_families(self) -> Iterator[Metric]:
        tracker, status = self.tracker, self.status
        yield _labelled(m.EXPORTER_EVENTS, tracker.events_by_type)
        yield _labelled(m.EXPORTER_MALFORMED, tracker.malformed)
        yield _labelled(m.EXPORTER_DUPLICATES, tracker.duplicates)
        yield _labelled(m.EXPORTER_LABEL_OVERFLOW, tracker.label_overflows())
        yield _labelled(m.EXPORTER_NEGATIVE_DURATIONS, tracker.negative_durations)
        yield _single(m.EXPORTER_BROKER_CONNECTED, 1 if status.connected else 0)
        yield _single(m.EXPORTER_RECONNECTS, status.reconnects)
        yield _single(m.EXPORTER_LAST_EVENT, tracker.last_event_at)
        yield _single(m.EXPORTER_TASKS_TRACKED, len(tracker.inflight))
        yield _single(m.EXPORTER_TASKS_EVICTED, tracker.evicted)
        build = _family(m.EXPORTER_BUILD_INFO)
        build.add_metric((self.version,), 1)
        yield build

    def _queue_families(self) -> list[Metric]:
        family = _family(m.QUEUE_LENGTH)
        lengths, errors = self.queue_lengths.snapshot()
        for queue, length in sorted(lengths.items()):
            family.add_metric((queue,), length)
        return [family, _single(m.EXPORTER_QUEUE_PROBE_ERRORS, errors)]


def _labelled(spec: m.MetricSpec, values: dict[str, int]) -> Metric:
    family = _family(spec)
    for label, value in sorted(values.items()):
        family.add_metric((label,), value)
    return family


def _single(spec: m.MetricSpec, value: float) -> Metric:
    family = _family(spec)
    family.add_metric((), value)
    return family
