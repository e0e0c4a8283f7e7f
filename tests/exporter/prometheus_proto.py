"""Prometheus' exposition schema (prometheus/client_model io/prometheus/client/metrics.proto,
the messages a scrape carries), built for the protobuf runtime here, to decode what the
exporter writes by hand with code that shares nothing with it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, timestamp_pb2
from google.protobuf.internal.decoder import _DecodeVarint32  # type: ignore[attr-defined]

F = descriptor_pb2.FieldDescriptorProto
OPTIONAL, REPEATED = F.LABEL_OPTIONAL, F.LABEL_REPEATED

#: message -> [(field, number, type, label, message type)], as in metrics.proto.
MESSAGES: dict[str, list[tuple[str, int, int, int, str]]] = {
    "LabelPair": [
        ("name", 1, F.TYPE_STRING, OPTIONAL, ""),
        ("value", 2, F.TYPE_STRING, OPTIONAL, ""),
    ],
    "Gauge": [("value", 1, F.TYPE_DOUBLE, OPTIONAL, "")],
    "Counter": [
        ("value", 1, F.TYPE_DOUBLE, OPTIONAL, ""),
        ("exemplar", 2, F.TYPE_MESSAGE, OPTIONAL, "Exemplar"),
        ("created_timestamp", 3, F.TYPE_MESSAGE, OPTIONAL, ".google.protobuf.Timestamp"),
    ],
    "Untyped": [("value", 1, F.TYPE_DOUBLE, OPTIONAL, "")],
    "Histogram": [
        ("sample_count", 1, F.TYPE_UINT64, OPTIONAL, ""),
        ("sample_count_float", 4, F.TYPE_DOUBLE, OPTIONAL, ""),
        ("sample_sum", 2, F.TYPE_DOUBLE, OPTIONAL, ""),
        ("bucket", 3, F.TYPE_MESSAGE, REPEATED, "Bucket"),
        ("created_timestamp", 15, F.TYPE_MESSAGE, OPTIONAL, ".google.protobuf.Timestamp"),
        ("schema", 5, F.TYPE_SINT32, OPTIONAL, ""),
        ("zero_threshold", 6, F.TYPE_DOUBLE, OPTIONAL, ""),
        ("zero_count", 7, F.TYPE_UINT64, OPTIONAL, ""),
        ("zero_count_float", 8, F.TYPE_DOUBLE, OPTIONAL, ""),
        ("negative_span", 9, F.TYPE_MESSAGE, REPEATED, "BucketSpan"),
        ("negative_delta", 10, F.TYPE_SINT64, REPEATED, ""),
        ("negative_count", 11, F.TYPE_DOUBLE, REPEATED, ""),
        ("positive_span", 12, F.TYPE_MESSAGE, REPEATED, "BucketSpan"),
        ("positive_delta", 13, F.TYPE_SINT64, REPEATED, ""),
        ("positive_count", 14, F.TYPE_DOUBLE, REPEATED, ""),
        ("exemplars", 16, F.TYPE_MESSAGE, REPEATED, "Exemplar"),
    ],
    "Bucket": [
        ("cumulative_count", 1, F.TYPE_UINT64, OPTIONAL, ""),
        ("cumulative_count_float", 4, F.TYPE_DOUBLE, OPTIONAL, ""),
        ("upper_bound", 2, F.TYPE_DOUBLE, OPTIONAL, ""),
        ("exemplar", 3, F.TYPE_MESSAGE, OPTIONAL, "Exemplar"),
    ],
    "BucketSpan": [
        ("offset", 1, F.TYPE_SINT32, OPTIONAL, ""),
        ("length", 2, F.TYPE_UINT32, OPTIONAL, ""),
    ],
    "Exemplar": [
        ("label", 1, F.TYPE_MESSAGE, REPEATED, "LabelPair"),
        ("value", 2, F.TYPE_DOUBLE, OPTIONAL, ""),
        ("timestamp", 3, F.TYPE_MESSAGE, OPTIONAL, ".google.protobuf.Timestamp"),
    ],
    "Metric": [
        ("label", 1, F.TYPE_MESSAGE, REPEATED, "LabelPair"),
        ("gauge", 2, F.TYPE_MESSAGE, OPTIONAL, "Gauge"),
        ("counter", 3, F.TYPE_MESSAGE, OPTIONAL, "Counter"),
        ("untyped", 5, F.TYPE_MESSAGE, OPTIONAL, "Untyped"),
        ("histogram", 7, F.TYPE_MESSAGE, OPTIONAL, "Histogram"),
        ("timestamp_ms", 6, F.TYPE_INT64, OPTIONAL, ""),
    ],
    "MetricFamily": [
        ("name", 1, F.TYPE_STRING, OPTIONAL, ""),
        ("help", 2, F.TYPE_STRING, OPTIONAL, ""),
        ("type", 3, F.TYPE_ENUM, OPTIONAL, "MetricType"),
        ("metric", 4, F.TYPE_MESSAGE, REPEATED, "Metric"),
        ("unit", 5, F.TYPE_STRING, OPTIONAL, ""),
    ],
}
METRIC_TYPES = ["COUNTER", "GAUGE", "SUMMARY", "UNTYPED", "HISTOGRAM", "GAUGE_HISTOGRAM"]


def _metric_family_class() -> Any:
    pool = descriptor_pool.DescriptorPool()
    pool.Add(descriptor_pb2.FileDescriptorProto.FromString(timestamp_pb2.DESCRIPTOR.serialized_pb))
    schema = descriptor_pb2.FileDescriptorProto(
        name="io/prometheus/client/metrics.proto",
        package="io.prometheus.client",
        syntax="proto2",
        dependency=["google/protobuf/timestamp.proto"],
    )
    kinds = schema.enum_type.add(name="MetricType")
    for number, name in enumerate(METRIC_TYPES):
        kinds.value.add(name=name, number=number)
    for message, fields in MESSAGES.items():
        proto = schema.message_type.add(name=message)
        for name, number, kind, label, type_name in fields:
            field = proto.field.add(name=name, number=number, type=kind, label=label)
            if type_name:
                field.type_name = (
                    type_name
                    if type_name.startswith(".")
                    else (f".io.prometheus.client.{type_name}")
                )
            if label == REPEATED and kind not in (F.TYPE_MESSAGE, F.TYPE_STRING):
                field.options.packed = True  # as client libraries write them
    pool.Add(schema)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("io.prometheus.client.MetricFamily")
    )


MetricFamily = _metric_family_class()


def families(body: bytes) -> Iterator[tuple[Any, bytes]]:
    """Each length-delimited MetricFamily of `body`, decoded, with the bytes it came from."""
    position = 0
    while position < len(body):
        size, position = _DecodeVarint32(body, position)
        raw = body[position : position + size]
        assert len(raw) == size, "a message cut short"
        yield MetricFamily.FromString(raw), raw
        position += size
