"""ECS `trace.id`, `span.id` and `transaction.id` from OpenTelemetry's current span.

When OpenTelemetry is installed and a span is active (opentelemetry-instrumentation-celery
starts one per task), every record gets its ids, so Kibana, APM and Grafana join a task's logs
with its trace. `transaction.id` is ECS's id of the service's entry span: the current span when
it is a local root (no parent, or a parent from another process); a record logged in a child
span carries the trace and span only. Without OpenTelemetry, or with no span, records are as
before and the cost is one failed import at start.
"""

from __future__ import annotations

from typing import Any

try:
    from opentelemetry import trace as _trace
except ImportError:  # OpenTelemetry is optional
    _trace = None  # type: ignore[assignment]


def trace_fields() -> dict[str, Any] | None:
    """The current span's ids as ECS fields, or None."""
    if _trace is None:
        return None
    span = _trace.get_current_span()
    context = span.get_span_context()
    if not context.is_valid:
        return None
    span_id = f"{context.span_id:016x}"
    fields: dict[str, Any] = {"trace": {"id": f"{context.trace_id:032x}"}, "span": {"id": span_id}}
    parent = getattr(span, "parent", None)  # the SDK's spans know it; others say nothing
    if hasattr(span, "parent") and (parent is None or parent.is_remote):
        fields["transaction"] = {"id": span_id}
    return fields
