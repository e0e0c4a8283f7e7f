"""Real log_shipping records and a small model of how Elasticsearch maps a document.

Shared by the mapping tests (test_es_mappings), the Kibana object tests (test_kibana_objects)
and the live Elasticsearch test (test_stack_setup); the `records` fixture is in conftest.py.
Run it to look at the records: python tests/es_mapping_model.py
"""

from __future__ import annotations

import fnmatch
import functools
import io
import json
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from celery.app.trace import LOG_RECEIVED

from celery_obs.log_shipping import console
from celery_obs.log_shipping.context import TaskContextFilter
from celery_obs.log_shipping.formatter import EcsJsonFormatter
from celery_obs.log_shipping.lifecycle import Lifecycle
from celery_obs.log_shipping.redact import Redactor
from celery_obs.setup.assets import Assets

from support import wait_for

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Assets(ROOT)
COMPONENT = ASSETS.component_template()
MAPPINGS = COMPONENT["template"]["mappings"]
#: Fields we leave to what every logs-* data stream maps anyway (documented, not guessed).
BUILTIN = {"@timestamp": {"type": "date"}}  # data streams map @timestamp as date by default


# -- real records ----------------------------------------------------------------------------


class FakeSink:
    """Stands in for the HTTP/Elasticsearch sink; reports two records refused for good."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.rejected = 2
        self.last_rejection = "mapper_parsing_exception: failed to parse field"

    def send(self, lines: list[bytes]) -> None:
        self.lines.extend(lines)

    def close(self) -> None:
        pass


def _traceback() -> Any:
    try:
        raise ValueError("bad value")
    except ValueError as exc:
        return exc.__traceback__


def traced(logger: logging.Logger) -> None:
    """A record logged inside an OpenTelemetry span (trace.id, span.id, transaction.id)."""
    from opentelemetry.sdk.trace import TracerProvider

    with TracerProvider().get_tracer("tests").start_as_current_span("task"):
        logger.info("inside a traced task")


@functools.lru_cache(maxsize=1)
def _started_app() -> Any:
    """One app per session: Celery warns (an error here) when a task name is registered again."""
    from celery import Celery

    app = Celery("proj", broker="redis://:hunter2@broker:6379/0", backend="redis://broker/1")

    @app.task(name="proj.send_email")
    def send_email() -> None:
        pass

    app.conf.task_default_queue = "emails"
    return app


def started_worker() -> SimpleNamespace:
    """What Celery's Worker gives celeryd_after_setup, on a real app (nothing connects)."""
    app = _started_app()
    return SimpleNamespace(
        app=app,
        hostname="celery@worker-1",
        pool_cls="prefork",
        concurrency=4,
        autoscale=None,
        task_events=True,
        quiet=False,
    )


def lifecycle_records() -> list[dict[str, Any]]:
    """Every lifecycle step, arguments on, through the real formatter and filter."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(EcsJsonFormatter(service_name="svc", hostname="host-1"))
    handler.addFilter(TaskContextFilter())
    lifecycle_logger = logging.getLogger("celery_obs.lifecycle")
    task_logger = logging.getLogger("tests.stack_setup.task")
    strategy_logger = logging.getLogger("celery.worker.strategy")
    loggers = (lifecycle_logger, task_logger, console.logger, strategy_logger)
    saved = [(lg, lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
        lg.propagate = False
    deep: dict[str, Any] = {"leaf": 1}
    for level in range(8):  # deeper than the redactor's limit: the tail becomes "[...]"
        deep = {f"level{level}": deep}
    request = SimpleNamespace(
        id="t-1",
        delivery_info={"routing_key": "emails"},
        retries=2,
        root_id="root-1",
        parent_id="parent-1",
        group="group-1",
        chord={"task": "proj.callback", "options": {"task_id": "callback-1"}},
        eta=datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=timezone.utc),
        hostname="celery@worker-1",
        args=[1, "two", 3.5, None, True, {"nested": {"deep": [1, "x"]}}, [4, [5, 6]], "x" * 300],
        kwargs={
            "password": "hunter2",
            "user": {"id": 7, "roles": ["a", "b"], "name": 3},
            "when": "2024-01-01",
            "items": [{"sku": 1}, {"sku": "two"}],
            "n": None,
            "deep": deep,
        },
    )
    task = SimpleNamespace(name="proj.send_email", request=request)
    string_eta = SimpleNamespace(**{**vars(request), "id": "t-7", "eta": "2024-05-01T12:00:00"})
    lifecycle = Lifecycle(Redactor())
    try:
        received = {"id": "t-1", "name": "proj.send_email", "args": "(1,)", "kwargs": "{}"}
        strategy_logger.info(LOG_RECEIVED, received, extra={"data": received})
        lifecycle.on_prerun(sender=task, task_id="t-1", task=task)
        task_logger.info("inside the task")
        try:
            raise KeyError("missing")
        except KeyError:
            task_logger.exception("lookup failed inside the task")
        lifecycle.on_success(sender=task, result=1, runtime=12.5)
        lifecycle.on_postrun()
        lifecycle.on_prerun(sender=task, task_id="t-1", task=task)
        lifecycle.on_success(sender=task, result=1)  # runtime from our own clock
        lifecycle.on_postrun()
        lifecycle.on_prerun(sender=task, task_id="t-2", task=task)
        lifecycle.on_failure(
            sender=task,
            task_id="t-2",
            exception=ValueError("bad value"),
            einfo=SimpleNamespace(tb=_traceback()),
        )
        lifecycle.on_retry(sender=task, request=request, reason="Retry in 1s")
        lifecycle.on_revoked(
            sender=task,
            request=SimpleNamespace(**{**vars(request), "id": "t-3", "task_name": "proj.x"}),
            terminated=True,
            signum=15,
            expired=False,
        )
        lifecycle.on_rejected(
            message=SimpleNamespace(headers={"id": "t-4", "task": "proj.y"}),
            exc=RuntimeError("bad message"),
        )
        lifecycle.on_unknown(name="proj.missing", id="t-5")
        lifecycle.on_internal_error(
            sender=task, task_id="t-6", request=request, exception=KeyError("k"), einfo=None
        )
        lifecycle.on_prerun(
            sender=SimpleNamespace(name="proj.later", request=string_eta),
            task_id="t-7",
            task=SimpleNamespace(name="proj.later", request=string_eta),
        )
        task_logger.warning("user labels", extra={"ecs": {"labels": {"a": 1, "b": "x", "c": True}}})
        console.on_after_setup(instance=started_worker())
        traced(task_logger)
    finally:
        lifecycle.on_postrun()  # the task context is per thread: leave none behind
        for lg, level, propagate in saved:
            lg.removeHandler(handler)
            lg.setLevel(level)
            lg.propagate = propagate
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def shipper_reports(spool: Path) -> list[dict[str, Any]]:
    """The records the shipper writes about itself (lines dropped, lines refused)."""
    from celery_obs.log_shipping.shipper import ShippingHandler

    sink = FakeSink()
    handler = ShippingHandler(sink, str(spool), flush_interval=0.05)
    handler.setFormatter(EcsJsonFormatter(service_name="svc", hostname="host-1"))
    handler.dropped = 3  # as if the in-memory queue had overflowed
    handler.emit(logging.LogRecord("x", logging.INFO, __file__, 1, "a line", None, None))

    def reports() -> list[dict[str, Any]]:
        records = [json.loads(line) for line in list(sink.lines)]
        return [r for r in records if r.get("log", {}).get("logger") == "celery_obs.log_shipping"]

    try:
        return wait_for(lambda: len(reports()) >= 2 and reports(), 10, "the shipper's reports")
    finally:
        handler.close()


# -- a small model of how Elasticsearch maps a document --------------------------------------


def mapping_at(path: tuple[str, ...]) -> dict[str, Any] | None:
    node: dict[str, Any] = {"properties": MAPPINGS["properties"]}
    for part in path:
        child = node.get("properties", {}).get(part)
        if child is None:
            return None
        node = child
    return node


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "long"
    if isinstance(value, float):
        return "double"
    if isinstance(value, str):
        return "string"
    return "object"


def dynamic_mapping(dotted: str, value: Any) -> dict[str, Any] | None:
    """What our dynamic templates (or the data stream defaults) give an unmapped field."""
    if dotted in BUILTIN:
        return BUILTIN[dotted]
    for entry in MAPPINGS["dynamic_templates"]:
        (spec,) = entry.values()
        if fnmatch.fnmatchcase(dotted, spec["path_match"]) and spec.get(
            "match_mapping_type", _json_type(value)
        ) == _json_type(value):
            return spec["mapping"]
    return None


def _date(value: Any) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return True  # epoch_millis
    try:
        datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


ACCEPTS = {
    "keyword": lambda v: isinstance(v, (str, int, float, bool)),
    "constant_keyword": lambda v: isinstance(v, str),
    "match_only_text": lambda v: isinstance(v, str),
    "text": lambda v: isinstance(v, str),
    "wildcard": lambda v: isinstance(v, str),
    "long": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": _number,
    "double": _number,
    "boolean": lambda v: isinstance(v, bool),
    "date": _date,
}


# A model of Elasticsearch's mapping rules, one branch per rule: read as a table, not split.
def check_document(  # noqa: C901
    doc: dict[str, Any], seen: set[str] | None = None
) -> list[str]:
    """Problems Elasticsearch would have with `doc` under our mappings (empty: it indexes)."""
    problems: list[str] = []
    seen = set() if seen is None else seen

    def walk(value: Any, path: tuple[str, ...], dynamic_parent: bool) -> None:  # noqa: C901
        dotted = ".".join(path)
        node = mapping_at(path) if path else {"properties": MAPPINGS["properties"]}
        if node is None and not isinstance(value, dict):
            node = dynamic_mapping(dotted, value)
        if node is None and isinstance(value, (dict, list)) and dynamic_parent:
            node = {"properties": {}}  # a new object under a mapped one: mapped dynamically
        if node is None:
            problems.append(f"{dotted}: not mapped (the record has {value!r})")
            return
        seen.add(dotted)
        kind = node.get("type", "object")
        if value is None:
            return
        if isinstance(value, list):
            for item in value:
                walk(item, path, dynamic_parent)
            return
        if kind == "flattened":
            if not isinstance(value, dict):
                problems.append(f"{dotted}: flattened takes objects only, the record has {value!r}")
            return
        if kind == "object" and node.get("enabled") is False:
            return  # kept in _source, not parsed: anything goes
        if isinstance(value, dict):
            if kind != "object":
                problems.append(f"{dotted}: mapped as {kind}, the record has an object")
                return
            for key, child in value.items():
                walk(child, (*path, *key.split(".")), True)
            return
        if kind == "object":
            problems.append(f"{dotted}: mapped as an object, the record has {value!r}")
        elif kind not in ACCEPTS:
            problems.append(f"{dotted}: no rule for mapping type {kind}")
        elif not ACCEPTS[kind](value):
            problems.append(f"{dotted}: mapped as {kind}, the record has {value!r}")

    walk(doc, (), False)
    return problems


if __name__ == "__main__":  # pragma: no cover - a handy way to look at the records
    json.dump(lifecycle_records(), sys.stdout, indent=2)
