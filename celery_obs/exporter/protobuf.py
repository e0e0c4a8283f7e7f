"""The Prometheus protobuf exposition (`io.prometheus.client.MetricFamily`, length-delimited):
the one format that carries native histograms.

Hand-written, because only a few messages are needed and the protobuf runtime is a large
dependency for them. Field numbers are those of prometheus/client_model's metrics.proto;
tests decode our output with the protobuf runtime against that schema, and a live Prometheus
with native histograms enabled ingests it.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence

from .native import ZERO_THRESHOLD, NativeBuckets

CONTENT_TYPE = (
    "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited"
)

# MetricType
COUNTER, GAUGE, HISTOGRAM = 0, 1, 4

_VARINT, _FIXED64, _LENGTH = 0, 1, 2
_double = struct.Struct("<d").pack


#: Varints below 128 are one byte: most counts, lengths and tags.
_ONE_BYTE = [bytes((value,)) for value in range(128)]


def varint(value: int) -> bytes:
    """An unsigned varint; a negative int64 is sent as its two's complement (10 bytes)."""
    if 0 <= value < 128:
        return _ONE_BYTE[value]
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def zigzag(value: int) -> int:
    """sint32/sint64: small magnitudes of either sign as small varints."""
    return (value << 1) ^ (value >> 63)


def _tag(field: int, wire: int) -> bytes:
    return varint((field << 3) | wire)


def length_delimited(field: int, payload: bytes) -> bytes:
    return _tag(field, _LENGTH) + varint(len(payload)) + payload


def double_field(field: int, value: float) -> bytes:
    return _tag(field, _FIXED64) + _double(value)


def varint_field(field: int, value: int) -> bytes:
    return _tag(field, _VARINT) + varint(value)


def string_field(field: int, value: str) -> bytes:
    return length_delimited(field, value.encode("utf-8", "replace"))


def label_pairs(names: Sequence[str], values: Iterable[str]) -> bytes:
    """Metric.label (field 1) for each name and value: cached by callers per series."""
    return b"".join(
        length_delimited(1, string_field(1, name) + string_field(2, value))
        for name, value in zip(names, values, strict=True)
    )


def family(name: str, help_text: str, metric_type: int, metrics: Iterable[bytes]) -> bytes:
    """One MetricFamily, preceded by its length (the `delimited` encoding)."""
    body = b"".join(
        (
            string_field(1, name),
            string_field(2, help_text),
            varint_field(3, metric_type),
            *(length_delimited(4, metric) for metric in metrics),
        )
    )
    return varint(len(body)) + body


# Metric.counter / Metric.gauge holding their 9-byte value (field 1, a double): fixed heads.
_COUNTER_HEAD = _tag(3, _LENGTH) + varint(9) + _tag(1, _FIXED64)
_GAUGE_HEAD = _tag(2, _LENGTH) + varint(9) + _tag(1, _FIXED64)


def counter(labels: bytes, value: float) -> bytes:
    """A Metric holding a Counter (field 3)."""
    return labels + _COUNTER_HEAD + _double(value)


def gauge(labels: bytes, value: float) -> bytes:
    """A Metric holding a Gauge (field 2)."""
    return labels + _GAUGE_HEAD + _double(value)


def timestamp(unix: float) -> bytes:
    """google.protobuf.Timestamp."""
    seconds = math.floor(unix)
    nanos = round((unix - seconds) * 1e9)
    if nanos >= 1_000_000_000:
        seconds, nanos = seconds + 1, nanos - 1_000_000_000
    return varint_field(1, seconds) + (varint_field(2, nanos) if nanos else b"")


def exemplar(task_id: str, value: float, at: float) -> bytes:
    return (
        length_delimited(1, string_field(1, "task_id") + string_field(2, task_id))
        + double_field(2, value)
        + length_delimited(3, timestamp(at))
    )


def bucket_bound(upper: float) -> bytes:
    """Bucket.upper_bound (field 2), encoded once per bound by callers."""
    return double_field(2, upper)


_BUCKET = _tag(3, _LENGTH)
_CUMULATIVE = _tag(1, _VARINT)
_EXEMPLAR = _tag(3, _LENGTH)


def histogram(
    labels: bytes,
    count: int,
    total: float,
    classic: Iterable[tuple[bytes, int, bytes | None]],
    native: NativeBuckets | None,
) -> bytes:
    """A Metric holding a Histogram (field 7): sample count and sum, the classic buckets
    ((`bucket_bound` of the upper bound, cumulative count, encoded exemplar or None), +Inf
    included), and the native buckets when given. A parser that reads native histograms takes
    those; others the classic."""
    parts = [varint_field(1, count), double_field(2, total)]
    for bound, cumulative, sample in classic:
        bucket = _CUMULATIVE + varint(cumulative) + bound
        if sample is not None:
            bucket += _EXEMPLAR + varint(len(sample)) + sample
        parts.append(_BUCKET + varint(len(bucket)) + bucket)
    if native is not None:
        spans, deltas = native.spans()
        parts.append(varint_field(5, zigzag(native.schema)))
        parts.append(double_field(6, ZERO_THRESHOLD))
        parts.append(varint_field(7, native.zero_count))
        for offset, length in spans:
            span = varint_field(1, zigzag(offset)) + varint_field(2, length)
            parts.append(length_delimited(12, span))
        if deltas:  # packed repeated sint64
            parts.append(length_delimited(13, b"".join(varint(zigzag(d)) for d in deltas)))
    return labels + length_delimited(7, b"".join(parts))
