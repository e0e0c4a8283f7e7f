"""Render the tracker's state at scrape time, as Prometheus text 0.0.4 or as OpenMetrics.

The text is written straight from the tracker's tables, with each series' name-and-labels prefix
built once and cached: a scrape costs one pass over the state and a string join, not a Python
object per sample (prometheus_client's MetricFamily/generate_latest path took 85 ms and most of a
core at 50 task names). Each scrape first lets the tracker `tick()` (worker liveness, parked
events), then reads its typed view; down workers drop out without touching any series object,
and counters show only label sets that happened.
Nothing here talks to the broker: queue lengths come from the background probe's cache.

OpenMetrics (what Prometheus asks for first) is the same series with its own metadata spelling
(counter and info families without their suffix), `# EOF`, and exemplars: each histogram bucket
carries the task id of its latest observation, the way from a slow bucket to that task's logs.

`CeleryCollector` adapts the same text to a prometheus_client registry for code that wants one.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from . import metrics as m
from . import protobuf as pb
from .aggregates import Histogram, LabelKey
from .occupancy import Gauges
from .tracker import Tracker, TrackerView

if TYPE_CHECKING:
    from .consumer import BrokerStatus
    from .queues import QueueLengths

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(value: str) -> str:
    """HELP text in the 0.0.4 format escapes backslash and newline (not quotes)."""
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(names: Sequence[str], values: Iterable[str]) -> str:
    return ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True))


def _float(value: float) -> str:
    """A float as the text format wants it: Python's repr, with Prometheus' spelling of Inf."""
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))  # 'nan' parses as NaN


_LOAD_WINDOWS = ("1m", "5m", "15m")


def _plain_id(task_id: str) -> bool:
    """An id that every OpenMetrics parser reads back: escaped quotes, backslashes and newlines
    are valid, but prometheus_client's parser rejects the whole exposition for them. Celery's
    own ids are UUIDs; only a hand-chosen id has these, and it gets no exemplar."""
    return '"' not in task_id and "\\" not in task_id and "\n" not in task_id


def _from_zero(keys: Mapping[LabelKey, object], values: Mapping[LabelKey, int]) -> dict:
    """`values` for every key of `keys` (0 where it has none), and its own keys too."""
    return {**dict.fromkeys(keys, 0), **values}


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
        self._text_headers = {
            spec.name: f"# HELP {spec.name} {_escape_help(spec.help)}\n"
            f"# TYPE {spec.name} {spec.text_type}\n"
            for spec in m.CATALOGUE
        }
        self._om_headers = {
            spec.name: f"# HELP {spec.family} {_escape(spec.help)}\n"
            f"# TYPE {spec.family} {spec.type}\n"
            for spec in m.CATALOGUE
        }
        self._headers = self._text_headers
        self._exemplars = False
        layout = tracker.metrics.buckets
        #: histogram metric -> its buckets' `le` values, +Inf last
        self._les = {
            spec.name: [_float(b) for b in layout.of(histogram)] + ["+Inf"]
            for spec, histogram in (
                (m.TASK_RUNTIME, "runtime"),
                (m.TASK_QUEUE_WAIT, "queue_wait"),
                (m.TASK_LATENCY, "latency"),
            )
        }
        # (metric name, label values) -> the series' text up to its value; bounded by the
        # label limits, so it never outgrows the state it mirrors.
        self._prefixes: dict[str, dict[LabelKey, str]] = {}
        self._bucket_prefixes: dict[tuple[str, LabelKey], list[str]] = {}
        #: The protobuf exposition's counterparts: (metric name) -> label values -> encoded
        #: label pairs, and each histogram's bucket bounds as numbers.
        self._proto = False
        self._proto_labels: dict[str, dict[LabelKey, bytes]] = {}
        self._bounds = {
            name: [pb.bucket_bound(b) for b in (*(float(le) for le in les[:-1]), math.inf)]
            for name, les in self._les.items()
        }

    def render(self, openmetrics: bool = False) -> bytes:
        """The whole exposition: Prometheus text 0.0.4, or OpenMetrics 1.0 with exemplars."""
        out: list[Any] = []
        with self.lock:  # the tracker's lock: also makes the format switch below private
            self._headers = self._om_headers if openmetrics else self._text_headers
            self._exemplars = openmetrics
            self._proto = False
            self._walk(out)
        if openmetrics:
            out.append("# EOF\n")
        # Labels are cleaned where they enter (aggregates.clean_label); "replace" is the last
        # line of defence: one odd string must never cost every later scrape.
        return "".join(out).encode("utf-8", "replace")

    def render_protobuf(self) -> bytes:
        """The whole exposition as length-delimited protobuf MetricFamily messages: the same
        series, with the duration histograms native (exponential) as well as classic."""
        out: list[Any] = []
        with self.lock:
            self._exemplars = True
            self._proto = True
            try:
                self._walk(out)
            finally:
                self._proto = False
        return b"".join(out)

    def _walk(self, out: list[Any]) -> None:
        self.tracker.tick()
        view = self.tracker.view()
        self._tasks(out, view)
        self._workers(out, view)
        self._exporter(out, view)
        self._queues(out)

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
        self, out: list[Any], spec: m.MetricSpec, values: Mapping, prune: bool = False
    ) -> None:
        if self._proto:
            self._proto_series(out, spec, values, prune)
            return
        out.append(self._headers[spec.name])
        prefix = self._prefix
        for key, value in values.items():
            out.append(f"{prefix(spec, key)}{_number(value)}\n")
        if prune:  # series that come and go (workers): forget the ones that went
            cache = self._prefixes.get(spec.name, {})
            for gone in cache.keys() - values.keys():
                del cache[gone]

    def _proto_labels_of(self, spec: m.MetricSpec, key: LabelKey) -> bytes:
        cache = self._proto_labels.setdefault(spec.name, {})
        labels = cache.get(key)
        if labels is None:
            labels = cache[key] = pb.label_pairs(spec.labels, key)
        return labels

    def _proto_series(
        self, out: list[Any], spec: m.MetricSpec, values: Mapping, prune: bool
    ) -> None:
        if values:  # client libraries send no empty family, and parsers need not expect one
            encode = pb.counter if spec.type == "counter" else pb.gauge
            labels = self._proto_labels_of
            metrics = [encode(labels(spec, key), value) for key, value in values.items()]
            kind = pb.COUNTER if spec.type == "counter" else pb.GAUGE
            out.append(pb.family(spec.name, spec.help, kind, metrics))
        if prune:
            cache = self._proto_labels.get(spec.name, {})
            for gone in cache.keys() - values.keys():
                del cache[gone]

    def _single(self, out: list[Any], spec: m.MetricSpec, value: float) -> None:
        if self._proto:
            self._proto_series(out, spec, {(): value}, prune=False)
            return
        out.append(f"{self._headers[spec.name]}{spec.name} {_number(value)}\n")

    def _labelled(self, out: list[Any], spec: m.MetricSpec, values: Mapping[str, int]) -> None:
        self._series(out, spec, {(label,): value for label, value in sorted(values.items())})

    def _histogram(
        self, out: list[Any], spec: m.MetricSpec, table: Mapping[LabelKey, Histogram]
    ) -> None:
        if self._proto:
            self._proto_histogram(out, spec, table)
            return
        out.append(self._headers[spec.name])
        for key, hist in table.items():
            buckets = self._bucket_prefixes.get((spec.name, key))
            if buckets is None:
                labels = _labels(spec.labels, key)
                sep = "," if labels else ""
                les = self._les[spec.name]
                buckets = [f'{spec.name}_bucket{{{labels}{sep}le="{le}"}} ' for le in les]
                self._bucket_prefixes[(spec.name, key)] = buckets
            cumulative = 0
            exemplars = hist.exemplars if self._exemplars else None
            if exemplars is None:
                for prefix, count in zip(buckets, hist.counts, strict=True):
                    cumulative += count
                    out.append(f"{prefix}{cumulative}\n")
            else:
                for prefix, count, exemplar in zip(buckets, hist.counts, exemplars, strict=True):
                    cumulative += count
                    if exemplar is None or not _plain_id(exemplar[0]):
                        out.append(f"{prefix}{cumulative}\n")
                    else:
                        task_id, value, at = exemplar
                        out.append(
                            f'{prefix}{cumulative} # {{task_id="{_escape(task_id)}"}} '
                            f"{_float(value)} {at:.3f}\n"
                        )
            out.append(f"{self._prefix(spec, key, '_sum')}{_float(hist.sum)}\n")
            out.append(f"{self._prefix(spec, key, '_count')}{cumulative}\n")

    def _proto_histogram(
        self, out: list[Any], spec: m.MetricSpec, table: Mapping[LabelKey, Histogram]
    ) -> None:
        if not table:
            return
        bounds = self._bounds[spec.name]
        metrics = []
        for key, hist in table.items():
            classic = []
            cumulative = 0
            exemplars = hist.exemplars or [None] * len(hist.counts)
            for bound, count, sample in zip(bounds, hist.counts, exemplars, strict=True):
                cumulative += count
                encoded = pb.exemplar(*sample) if sample is not None else None
                classic.append((bound, cumulative, encoded))
            labels = self._proto_labels_of(spec, key)
            metrics.append(pb.histogram(labels, cumulative, hist.sum, classic, hist.native))
        out.append(pb.family(spec.name, spec.help, pb.HISTOGRAM, metrics))

    # -- families -----------------------------------------------------------------------------

    def _tasks(self, out: list[Any], view: TrackerView) -> None:
        for kind, spec in m.TASK_COUNTERS.items():
            self._series(out, spec, view.task_counts[kind])
        self._histogram(out, m.TASK_RUNTIME, view.runtime)
        self._histogram(out, m.TASK_QUEUE_WAIT, view.queue_wait)
        self._histogram(out, m.TASK_LATENCY, view.latency)
        # Every (name, queue) a worker ever received shows in the running and waiting gauges,
        # at 0 when nothing is there (graphs and sums fall to 0 instead of stopping), and in
        # the lost counter from 0: a loss is rare, and a counter that first appears at 3 is
        # invisible to increase(), so the first one would never alert.
        received = view.task_counts["task-received"]
        self._occupancy(
            out, m.TASK_ACTIVE, m.TASK_OLDEST_ACTIVE_AGE, view.running, received, view.now
        )
        self._occupancy(
            out, m.TASK_WAITING, m.TASK_OLDEST_WAITING_AGE, view.waiting, received, view.now
        )
        lost = view.worker_lost
        self._series(out, m.TASK_WORKER_LOST, _from_zero(received, lost))
        for kind, spec in m.TASK_LAST_AT.items():
            self._series(out, spec, {(name,): at for name, at in view.last_at[kind].items()})

    def _occupancy(
        self,
        out: list[Any],
        count_spec: m.MetricSpec,
        age_spec: m.MetricSpec,
        gauges: Gauges,
        received: Mapping[LabelKey, int],
        now: float,
    ) -> None:
        self._series(out, count_spec, _from_zero(received, gauges.counts))
        # An age is never negative: a worker clock ahead of ours makes a task start "later".
        ages = {key: max(0.0, now - since) for key, since in gauges.oldest.items()}
        self._series(out, age_spec, ages, prune=True)

    def _workers(self, out: list[Any], view: TrackerView) -> None:
        views = view.workers
        series = self._series
        series(out, m.WORKER_UP, {(v.hostname,): int(v.up) for v in views}, prune=True)
        lost = {(v.hostname,): int(v.state == "lost") for v in views}
        series(out, m.WORKER_LOST, lost, prune=True)
        series(out, m.WORKER_TASKS_ACTIVE, {(v.hostname,): v.active for v in views}, prune=True)
        reserved = view.reserved
        series(
            out,
            m.WORKER_TASKS_RESERVED,
            {(v.hostname,): reserved.get(v.hostname, 0) if v.up else 0 for v in views},
            prune=True,
        )
        series(out, m.WORKER_TASKS_PROCESSED, {(v.hostname,): v.processed for v in views}, True)
        series(out, m.WORKER_LAST_HEARTBEAT, {(v.hostname,): v.last_seen for v in views}, True)
        loads = {}
        for v in views:
            if v.load is not None:
                for window, load in zip(_LOAD_WINDOWS, v.load, strict=True):
                    loads[(v.hostname, window)] = load
        series(out, m.WORKER_LOAD_AVERAGE, loads, prune=True)
        series(out, m.WORKER_INFO, {(v.hostname, *v.software): 1 for v in views}, prune=True)

    def _exporter(self, out: list[Any], view: TrackerView) -> None:
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

    def _queues(self, out: list[Any]) -> None:
        lengths, errors = self.queue_lengths.snapshot()
        self._series(out, m.QUEUE_LENGTH, {(q,): n for q, n in sorted(lengths.items())})
        self._single(out, m.EXPORTER_QUEUE_PROBE_ERRORS, errors)
        self._single(out, m.EXPORTER_BROADCAST_ERRORS, self.status.broadcast_errors)


class CeleryCollector:
    """The exposition as a prometheus_client collector (parsed back from its own text).

    prometheus_client is imported only here: the exporter itself never needs its ~10 MB.
    """

    def __init__(self, exposition: Exposition) -> None:
        self.exposition = exposition

    def collect(self) -> Iterator[Any]:
        from prometheus_client.parser import text_string_to_metric_families

        yield from text_string_to_metric_families(self.exposition.render().decode())
