"""With OpenTelemetry (the real SDK and Celery instrumentation, spans kept in memory), every
record logged while a span is active carries its trace, span and transaction ids; without a
span, or without OpenTelemetry, records carry none."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from celery import Celery

from celery_obs.log_shipping import tracing
from celery_obs.log_shipping.context import TaskContextFilter
from celery_obs.log_shipping.formatter import EcsJsonFormatter
from celery_obs.log_shipping.lifecycle import Lifecycle

otel_trace = pytest.importorskip("opentelemetry.trace")
sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
in_memory = pytest.importorskip("opentelemetry.sdk.trace.export.in_memory_span_exporter")
export = pytest.importorskip("opentelemetry.sdk.trace.export")
celery_instrumentation = pytest.importorskip("opentelemetry.instrumentation.celery")


@pytest.fixture
def provider() -> sdk_trace.TracerProvider:
    return sdk_trace.TracerProvider()


@pytest.fixture
def spans(provider) -> Iterator[in_memory.InMemorySpanExporter]:
    exporter = in_memory.InMemorySpanExporter()
    provider.add_span_processor(export.SimpleSpanProcessor(exporter))
    instrumentor = celery_instrumentation.CeleryInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        yield exporter
    finally:
        instrumentor.uninstrument()


@pytest.fixture
def records() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(EcsJsonFormatter(service_name="svc"))
    handler.addFilter(TaskContextFilter())
    loggers = [logging.getLogger(name) for name in ("tests.traced", "celery_obs.lifecycle")]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_tasks_records_carry_its_trace_and_span(provider, spans, records) -> None:
    app = Celery("traced", broker="memory://", set_as_current=False)
    app.conf.task_always_eager = True
    logger = logging.getLogger("tests.traced")

    @app.task(name="traced.work")
    def work() -> int:
        logger.info("inside the traced task")
        with provider.get_tracer("tests").start_as_current_span("step"):
            logger.info("inside a child span")
        return 1

    lifecycle = Lifecycle(None)
    lifecycle.connect()
    try:
        work.delay()
    finally:
        lifecycle.disconnect()
    [task_span] = [s for s in spans.get_finished_spans() if s.name.startswith("run/")]
    [step] = [s for s in spans.get_finished_spans() if s.name == "step"]
    trace_id = f"{task_span.context.trace_id:032x}"
    task_span_id = f"{task_span.context.span_id:016x}"
    by_message = {r["message"]: r for r in lines(records)}

    inside = by_message["inside the traced task"]
    assert inside["trace"] == {"id": trace_id}
    assert inside["span"] == {"id": task_span_id}
    assert inside["transaction"] == {"id": task_span_id}  # the task's span is the entry span
    assert inside["celery"]["task"]["name"] == "traced.work"

    child = by_message["inside a child span"]
    assert child["trace"] == {"id": trace_id}
    assert child["span"] == {"id": f"{step.context.span_id:016x}"}
    assert "transaction" not in child  # a child span's record does not guess the entry span

    succeeded = next(m for m in by_message if m.endswith("succeeded"))
    assert by_message[succeeded]["trace"] == {"id": trace_id}


def test_no_span_no_trace_fields(records) -> None:
    logging.getLogger("tests.traced").info("no span here")
    [record] = lines(records)
    assert not {"trace", "span", "transaction"} & set(record)


def test_without_opentelemetry_records_are_unchanged(provider, records, monkeypatch) -> None:
    monkeypatch.setattr(tracing, "_trace", None)
    with provider.get_tracer("tests").start_as_current_span("ignored"):
        logging.getLogger("tests.traced").info("opentelemetry missing")
    [record] = lines(records)
    assert "trace" not in record
