"""Native (exponential, sparse) histogram buckets, as Prometheus defines them: served beside the
classic buckets when a scrape asks for the protobuf exposition.

Schema `s` splits every power of two into 2**s buckets whose bounds grow by 2**(2**-s); bucket
`i` holds the values in (base**(i-1), base**i], so 1.0 is always a bound. Values at or below
the zero threshold count in the zero bucket. Only populated buckets are kept, so a histogram
costs memory for the spread of what it saw, not for its range. A histogram that would pass
MAX_BUCKETS halves its resolution (schema - 1, pairs of buckets merged) instead of growing,
as Prometheus' client libraries do: an adversarial spread of durations costs a bounded table.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from math import frexp

#: 8 buckets per power of two: bounds 9 % apart, the resolution client_golang starts with
#: (its NativeHistogramBucketFactor 1.1).
SCHEMA = 3
#: Durations are never negative (ours are clamped at 0); 0 and anything this close to it go to
#: the zero bucket. Prometheus' client libraries default to 2**-128 too.
ZERO_THRESHOLD = 2.0**-128
#: Most buckets one histogram keeps (Prometheus' and OpenTelemetry's usual limit).
MAX_BUCKETS = 160
#: The lowest schema Prometheus accepts.
MIN_SCHEMA = -4

#: schema -> the bounds of one power of two's buckets, as mantissas in [0.5, 1).
_MANTISSA_BOUNDS = {
    schema: [2.0 ** (j / 2**schema) / 2 for j in range(2**schema)] for schema in range(1, 9)
}


def bucket_index(value: float, schema: int) -> int:
    """The index of the bucket holding `value` (> 0) at `schema`: base**(i-1) < value <= base**i.

    From the exact binary mantissa and exponent (math.frexp), not a logarithm, so a value on a
    bound lands where Prometheus' own client libraries put it."""
    mantissa, exponent = math.frexp(value)  # value = mantissa * 2**exponent, 0.5 <= mantissa < 1
    if schema > 0:
        bounds = _MANTISSA_BOUNDS[schema]
        return bisect_left(bounds, mantissa) + (exponent - 1) * len(bounds)
    index = exponent - 1 if mantissa == 0.5 else exponent
    return (index + (1 << -schema) - 1) >> -schema


class NativeBuckets:
    """The positive buckets and zero bucket of one native histogram (its sum and count are the
    classic histogram's, which sees the same observations)."""

    __slots__ = ("buckets", "schema", "zero_count")

    def __init__(self, schema: int = SCHEMA) -> None:
        self.schema = schema
        self.zero_count = 0
        #: bucket index -> observations in it
        self.buckets: dict[int, int] = {}

    def observe(self, value: float) -> None:
        """One observation of a finite `value` >= 0."""
        if value <= ZERO_THRESHOLD:
            self.zero_count += 1
            return
        schema = self.schema
        if schema > 0:  # bucket_index, inlined: this runs for every duration measured
            mantissa, exponent = frexp(value)
            bounds = _MANTISSA_BOUNDS[schema]
            index = bisect_left(bounds, mantissa) + (exponent - 1) * len(bounds)
        else:
            index = bucket_index(value, schema)
        buckets = self.buckets
        buckets[index] = buckets.get(index, 0) + 1
        while len(self.buckets) > MAX_BUCKETS and self.schema > MIN_SCHEMA:
            self._halve_resolution()

    def _halve_resolution(self) -> None:
        # Bucket i at schema s is half of bucket ceil(i / 2) at s - 1: (i + 1) >> 1 (also for
        # negative i, as >> floors).
        merged: dict[int, int] = {}
        for index, count in self.buckets.items():
            key = (index + 1) >> 1
            merged[key] = merged.get(key, 0) + count
        self.buckets = merged
        self.schema -= 1

    def spans(self) -> tuple[list[tuple[int, int]], list[int]]:
        """The populated buckets as the exposition sends them: spans of consecutive indexes
        ((gap to the previous span's end, or the first index), length), and each bucket's count
        as a delta to the previous bucket's. An empty histogram has one span (0, 0), which
        tells a parser it is native even before its first observation."""
        if not self.buckets:
            return [(0, 0)], []
        spans: list[tuple[int, int]] = []
        deltas: list[int] = []
        previous_index: int | None = None
        previous_count = 0
        start = length = 0
        for index in sorted(self.buckets):
            count = self.buckets[index]
            if previous_index is None:
                start, length = index, 1
            elif index == previous_index + 1:
                length += 1
            else:
                spans.append((start, length))
                start, length = index - previous_index - 1, 1
            deltas.append(count - previous_count)
            previous_index, previous_count = index, count
        spans.append((start, length))
        return spans, deltas
