"""Native histograms: the exponential buckets against their definition, and the protobuf
exposition decoded by the protobuf runtime (against Prometheus' schema) and compared with the
text exposition of the same state, series by series."""

from __future__ import annotations

import math
import threading
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from celery_obs.exporter import native
from celery_obs.exporter.collector import Exposition
from celery_obs.exporter.config import Limits
from celery_obs.exporter.consumer import BrokerStatus
from celery_obs.exporter.native import NativeBuckets, bucket_index
from celery_obs.exporter.queues import QueueLengths
from celery_obs.exporter.tracker import Tracker

from test_tracker import Clock, ev, received, sent

pytest.importorskip("google.protobuf")
from prometheus_proto import METRIC_TYPES, families

positive = st.floats(min_value=1e-300, max_value=1e300, allow_nan=False, allow_infinity=False)


@given(positive, st.integers(min_value=native.MIN_SCHEMA, max_value=8))
def test_a_value_lands_in_the_bucket_whose_bounds_hold_it(value: float, schema: int) -> None:
    index = bucket_index(value, schema)
    # Bucket i holds (base**(i-1), base**i] with base = 2**(2**-schema); in logs, exact enough
    # away from a bound (one ulp of slack either way).
    position = math.log2(value) * 2.0**schema
    assert index - 1 - 1e-9 <= position <= index + 1e-9


@pytest.mark.parametrize("schema", [-4, -1, 0, 1, 3, 8])
def test_bounds_are_exact_powers_of_two(schema: int) -> None:
    """At schema >= 0 every power of two is a bound; below 0, every 2**(2**-schema)-th."""
    step = 2 ** max(0, -schema)
    for exponent in range(-48, 49, step):
        value = 2.0**exponent
        expected = exponent * 2**schema if schema >= 0 else exponent // step
        assert bucket_index(value, schema) == expected, value
        # Just above a bound: the next bucket.
        assert bucket_index(math.nextafter(value, math.inf), schema) == expected + 1


def spans_to_buckets(spans: list[tuple[int, int]], deltas: list[int]) -> dict[int, int]:
    """The decoding Prometheus does: absolute indexes and counts from spans and deltas."""
    buckets, index, count, at = {}, 0, 0, 0
    for number, (offset, length) in enumerate(spans):
        index = offset if number == 0 else index + offset + 1
        for step in range(length):
            if step:
                index += 1
            count += deltas[at]
            at += 1
            buckets[index] = count
        if length == 0 and number == 0:
            index -= 1  # a no-op span moves nothing
    assert at == len(deltas)
    return buckets


@given(st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), max_size=300))
def test_spans_and_deltas_encode_exactly_the_buckets(values: list[float]) -> None:
    buckets = NativeBuckets()
    for value in values:
        buckets.observe(value)
    spans, deltas = buckets.spans()
    if buckets.buckets:
        assert spans_to_buckets(spans, deltas) == buckets.buckets
    else:
        assert (spans, deltas) == ([(0, 0)], [])
    assert buckets.zero_count + sum(buckets.buckets.values()) == len(values)


def test_a_wide_spread_halves_the_resolution_instead_of_growing() -> None:
    buckets = NativeBuckets()
    values = [1.01**i for i in range(-4000, 4000)]  # 115 powers of two, densely
    for value in values:
        buckets.observe(value)
    assert len(buckets.buckets) <= native.MAX_BUCKETS
    assert buckets.schema < native.SCHEMA
    # The merged table is what the final schema gives each value directly.
    assert buckets.buckets == Counter(bucket_index(v, buckets.schema) for v in values)


@pytest.fixture
def exposition() -> tuple[Tracker, Exposition]:
    tracker = Tracker(Limits(worker_timeout=10, worker_retention=60), clock=Clock())
    return tracker, Exposition(tracker, threading.Lock(), BrokerStatus(), QueueLengths(), "1.2.3")


RUNTIMES = [0.0, 0.003, 0.011, 0.02, 0.3, 0.3, 0.31, 1.7, 42.0, 5000.0]


def test_the_protobuf_exposition_is_the_text_one_with_native_histograms(exposition) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    tracker, rendering = exposition
    for number, runtime in enumerate(RUNTIMES):
        uuid, end = f"t{number}", 900.0 + number * 10
        tracker.handle_all(
            [
                sent(uuid, ts=end - runtime - 1),
                received(uuid, ts=end - runtime - 1),
                ev("task-started", uuid, end - runtime),
                ev("task-succeeded", uuid, end, runtime=runtime),
            ]
        )
    tracker.handle({"type": "worker-heartbeat", "hostname": "w@h", "active": 1})
    body = rendering.render_protobuf()
    decoded = {}
    for family, raw in families(body):
        # Every byte is a field Prometheus' schema knows, numbered and typed as it says: the
        # runtime writes back the very bytes it read.
        assert family.SerializeToString() == raw, family.name
        decoded[family.name] = family
    text = {f.name: f for f in text_string_to_metric_families(rendering.render().decode())}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in text.values() for s in f.samples
    }
    seen = set()
    for name, family in decoded.items():
        kind = METRIC_TYPES[family.type]
        for metric in family.metric:
            labels = tuple(sorted((p.name, p.value) for p in metric.label))
            if kind == "HISTOGRAM":
                hist = metric.histogram
                for bucket in hist.bucket:
                    le = "+Inf" if math.isinf(bucket.upper_bound) else repr(bucket.upper_bound)
                    key = (f"{name}_bucket", tuple(sorted((*labels, ("le", le)))))
                    assert samples[key] == bucket.cumulative_count, key
                    seen.add(key)
                for suffix, value in (("_count", hist.sample_count), ("_sum", hist.sample_sum)):
                    assert samples[(name + suffix, labels)] == value
                    seen.add((name + suffix, labels))
                buckets = spans_to_buckets(
                    [(s.offset, s.length) for s in hist.positive_span], list(hist.positive_delta)
                )
                assert hist.zero_count + sum(buckets.values()) == hist.sample_count
                assert hist.zero_threshold == native.ZERO_THRESHOLD
            else:
                assert kind == ("COUNTER" if name.endswith("_total") else "GAUGE"), name
                value = metric.counter.value if kind == "COUNTER" else metric.gauge.value
                assert samples[(name, labels)] == value, (name, labels)
                seen.add((name, labels))
    assert seen == set(samples), "the same series in both expositions"
    runtime = decoded["celery_task_runtime_seconds"].metric[0].histogram
    assert runtime.schema == native.SCHEMA
    assert runtime.zero_count == 1  # the 0.0 runtime
    expected = Counter(math.ceil(math.log2(r) * 2**native.SCHEMA) for r in RUNTIMES if r)
    spans = [(s.offset, s.length) for s in runtime.positive_span]
    assert spans_to_buckets(spans, list(runtime.positive_delta)) == dict(expected)
    # Exemplars ride on the classic buckets: the 42 s run is the latest one up to 300 s.
    [sample] = [
        b.exemplar for b in runtime.bucket if b.upper_bound == 300.0 and b.HasField("exemplar")
    ]
    assert [(p.name, p.value) for p in sample.label] == [("task_id", "t8")]
    assert sample.value == 42.0
    assert sample.timestamp.seconds == 980
