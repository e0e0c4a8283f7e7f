"""ECS JSON log lines, built on python-json-logger.

Field layout follows Elastic's ecs-logging libraries: `@timestamp` (UTC, milliseconds),
`log.level`, `message` and `ecs.version` come first as dotted keys, everything else is nested
(`log.logger`, `service.name`, `host.hostname`, `process.pid`, `error.*`, `celery.task.*`).
Structured fields reach a record through `extra={"ecs": {...}}` (nested dicts, merged) and the
current task's id and name through `context.TaskContextFilter`. Other `extra={...}` fields are
kept at the top level (merged the same way; ECS fields win on a clash).

A record orjson cannot write (an int beyond 64 bits, a lone surrogate, nesting past its limit)
is written by the standard library instead, big ints as strings: a record is never lost to its
values.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import traceback
from datetime import datetime, timezone
from typing import Any

from pythonjsonlogger.core import RESERVED_ATTRS, merge_record_extra
from pythonjsonlogger.json import JsonEncoder, JsonFormatter

try:  # python-json-logger's orjson variant serialises several times faster
    from pythonjsonlogger.orjson import OrjsonFormatter as _Base
except ImportError:  # pragma: no cover - orjson is optional
    _Base = JsonFormatter  # type: ignore[assignment,misc]

ECS_VERSION = "8.11.0"
#: LogRecord attribute carrying nested ECS fields (`extra={"ecs": {...}}`).
ECS_ATTR = "ecs"
#: LogRecord attribute the context filter sets: {"id": ..., "name": ...} of the running task.
TASK_ATTR = "celery_task"

#: The ints Elasticsearch stores as numbers (`long`); others are written as strings.
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
#: Record attributes that are never copied out as `extra` fields: ours (rendered as ECS
#: fields), and LogRecord's own (`taskName` is 3.12's; stack and exception become error.*).
_NOT_EXTRA = frozenset(
    {ECS_ATTR, TASK_ATTR, "taskName", "stack_info", "exc_info", "exc_text", "message", "asctime"}
)
#: Past this depth the fallback writes "[...]" (orjson's own limit is 254).
_MAX_DEPTH = 100


def merge(into: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `fields` into `into` (nested dicts merge, other values replace). Dicts are
    copied in, never shared: later merges must not change the caller's `extra` dicts."""
    for key, value in fields.items():
        if isinstance(value, dict):
            target = into.get(key)
            into[key] = merge(target if isinstance(target, dict) else {}, value)
        else:
            into[key] = value
    return into


def int_text(value: int) -> str:
    """An int as text, even one longer than `sys.get_int_max_str_digits()` allows."""
    try:
        return str(value)
    except ValueError:
        return f"[{value.bit_length()}-bit int]"


def _plain(value: Any, depth: int = 0, path: frozenset[int] = frozenset()) -> Any:
    """`value` made writable by any JSON encoder: ints out of 64-bit range as strings,
    non-finite floats as null (as orjson writes them), keys as strings, cycles and depth cut,
    other objects through python-json-logger's encoder (datetimes, dataclasses, bytes...)."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, int):
        return value if INT_MIN <= value <= INT_MAX else int_text(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if depth >= _MAX_DEPTH:
        return "[...]"
    if id(value) in path:
        return "[circular]"
    inner = path | {id(value)}
    if isinstance(value, dict):
        return {
            (k if isinstance(k, str) else str(_plain(k, depth + 1, inner))): _plain(
                v, depth + 1, inner
            )
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [_plain(v, depth + 1, inner) for v in value]
    try:
        converted = JsonEncoder().default(value)
    except Exception:  # a broken __str__ or __repr__: the record still goes out
        converted = f"<{type(value).__name__}>"
    return _plain(converted, depth + 1, inner)


# The last whole second formatted, and its text; one tuple, read once, so threads that race on
# it never pair one second's text with another's.
_last_second: list[tuple[int, str]] = [(-1, "")]


def _timestamp(created: float) -> str:
    """ISO 8601 UTC with milliseconds; the date-time part is formatted once per second (it was
    a fifth of the formatter's cost, and records come in bursts)."""
    second = int(created)
    cached = _last_second[0]
    if cached[0] != second:
        text = datetime.fromtimestamp(second, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.")
        cached = _last_second[0] = (second, text)
    return f"{cached[1]}{int((created - second) * 1000):03d}Z"


class EcsJsonFormatter(_Base):
    """One JSON object per record, ECS field names."""

    def __init__(
        self, service_name: str = "celery", hostname: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.service_name = service_name
        self.hostname = hostname or socket.gethostname()
        self._not_extra = _NOT_EXTRA | set(self.reserved_attrs) | set(RESERVED_ATTRS)

    def jsonify_log_record(self, log_data: dict[str, Any]) -> str:
        try:
            return super().jsonify_log_record(log_data)
        except (TypeError, ValueError):  # orjson: "Integer exceeds 64-bit range" and the like
            return json.dumps(_plain(log_data), ensure_ascii=True, allow_nan=False)

    def _extras(self, record: logging.LogRecord) -> dict[str, Any]:
        """`extra={...}` fields of the record. Celery passes the context of its own messages
        (task arguments' repr included, unredacted) as `extra={"data": ...}`: never shipped."""
        extras = merge_record_extra(record, {}, reserved=self._not_extra)
        if "data" in extras and (
            extras["data"] is record.args
            or record.name == "celery"
            or record.name.startswith("celery.")
        ):
            del extras["data"]
        return extras

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        log_data["@timestamp"] = _timestamp(record.created)
        log_data["log.level"] = record.levelname.lower()
        log_data["message"] = record.message
        log_data["ecs.version"] = ECS_VERSION
        log_data["log"] = {
            "logger": record.name,
            "origin": {
                "file": {"name": record.filename, "line": record.lineno},
                "function": record.funcName,
            },
        }
        log_data["service"] = {"name": self.service_name}
        log_data["host"] = {"hostname": self.hostname}
        log_data["process"] = {
            "pid": record.process,
            "name": record.processName,
            "thread": {"id": record.thread, "name": record.threadName},
        }
        message_dict.pop("exc_info", None)  # rendered as error.* below
        message_dict.pop("stack_info", None)  # likewise, when there is no exception
        if record.exc_info and record.exc_info[0] is not None:
            exc_type, exc, tb = record.exc_info
            log_data["error"] = {
                "type": exc_type.__name__,
                "message": str(exc),
                "stack_trace": "".join(traceback.format_exception(exc_type, exc, tb)),
            }
        elif record.stack_info:  # logger.info(..., stack_info=True)
            log_data["error"] = {"stack_trace": record.stack_info}
        extras = self._extras(record)
        if extras:
            merge(log_data, extras)
        task = getattr(record, TASK_ATTR, None)
        if task:
            merge(log_data, {"celery": {"task": dict(task)}})
        fields = getattr(record, ECS_ATTR, None)
        if isinstance(fields, dict):
            merge(log_data, fields)
        if message_dict:  # logger.info({...}) style records
            merge(log_data, message_dict)
