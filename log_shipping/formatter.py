"""ECS JSON log lines, built on python-json-logger.

Field layout follows Elastic's ecs-logging libraries: `@timestamp` (UTC, milliseconds),
`log.level`, `message` and `ecs.version` come first as dotted keys, everything else is nested
(`log.logger`, `service.name`, `host.hostname`, `process.pid`, `error.*`, `celery.task.*`).
Structured fields reach a record through `extra={"ecs": {...}}` (nested dicts, merged) and the
current task's id and name through `context.TaskContextFilter`.
"""

from __future__ import annotations

import logging
import socket
import traceback
from datetime import datetime, timezone
from typing import Any

from pythonjsonlogger.json import JsonFormatter

try:  # python-json-logger's orjson variant serialises several times faster
    from pythonjsonlogger.orjson import OrjsonFormatter as _Base
except ImportError:  # pragma: no cover - orjson is optional
    _Base = JsonFormatter  # type: ignore[assignment,misc]

ECS_VERSION = "8.11.0"
#: LogRecord attribute carrying nested ECS fields (`extra={"ecs": {...}}`).
ECS_ATTR = "ecs"
#: LogRecord attribute the context filter sets: {"id": ..., "name": ...} of the running task.
TASK_ATTR = "celery_task"


def merge(into: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `fields` into `into` (nested dicts merge, other values replace)."""
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value
    return into


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
        if record.exc_info and record.exc_info[0] is not None:
            exc_type, exc, tb = record.exc_info
            log_data["error"] = {
                "type": exc_type.__name__,
                "message": str(exc),
                "stack_trace": "".join(traceback.format_exception(exc_type, exc, tb)),
            }
        task = getattr(record, TASK_ATTR, None)
        if task:
            log_data["celery"] = {"task": dict(task)}
        fields = getattr(record, ECS_ATTR, None)
        if isinstance(fields, dict):
            merge(log_data, fields)
        if message_dict:  # logger.info({...}) style records
            merge(log_data, message_dict)
