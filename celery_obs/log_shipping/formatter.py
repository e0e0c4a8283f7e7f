"""ECS JSON log lines, built on python-json-logger.

Field layout follows Elastic's ecs-logging libraries: `@timestamp` (UTC, milliseconds),
`log.level`, `message` and `ecs.version` come first as dotted keys, everything else is nested
(`log.logger`, `service.name`, `host.hostname`, `process.pid`, `error.*`, `celery.task.*`).
Structured fields reach a record through `extra={"ecs": {...}}` (nested dicts, merged) and the
current task's id and name through `context.TaskContextFilter`; OpenTelemetry's trace and span
ids, when a span is active, through `tracing.trace_fields`. Other `extra={...}` fields are
kept at the top level (merged the same way; ECS fields win on a clash).

Secrets never leave: the message (its arguments included), the exception's message and the
stack trace are scrubbed by value (`scrub.py`), and `extra` fields by key and value
(`redact.Redactor.fields`), which also turns a container holding itself into "[circular]".
A record orjson cannot write (a lone surrogate, nesting past its limit) is written by the
standard library instead: a record is never lost to its values.
"""

from __future__ import annotations

import json
import logging
import socket
import traceback
from datetime import datetime, timezone
from typing import Any

from pythonjsonlogger.core import RESERVED_ATTRS, merge_record_extra
from pythonjsonlogger.json import JsonFormatter

from .redact import Redactor
from .tracing import trace_fields

try:  # python-json-logger's orjson variant serialises several times faster
    from pythonjsonlogger.orjson import OrjsonFormatter as _Base
except ImportError:  # pragma: no cover - orjson is optional
    _Base = JsonFormatter  # type: ignore[assignment,misc]

ECS_VERSION = "8.11.0"
#: LogRecord attribute carrying nested ECS fields (`extra={"ecs": {...}}`).
ECS_ATTR = "ecs"
#: LogRecord attribute the context filter sets: {"id": ..., "name": ...} of the running task.
TASK_ATTR = "celery_task"
#: LogRecord attribute saying the `ecs` fields were made safe already (the lifecycle records'
#: are built from redacted arguments): not walked again, which would triple their cost.
REDACTED_ATTR = "celery_obs_redacted"

#: Record attributes that are never copied out as `extra` fields: ours (rendered as ECS
#: fields), and LogRecord's own (`taskName` is 3.12's; stack and exception become error.*).
_NOT_EXTRA = frozenset(
    {
        ECS_ATTR,
        TASK_ATTR,
        REDACTED_ATTR,
        "taskName",
        "stack_info",
        "exc_info",
        "exc_text",
        "message",
        "asctime",
    }
)


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


def _text(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # a broken __str__ must not cost the record
        return f"<{type(exc).__name__}>"


_FORMATS_CACHED = 1024  # format strings whose scan is remembered

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
        self,
        service_name: str = "celery",
        hostname: str | None = None,
        redactor: Redactor | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.service_name = service_name
        #: Default patterns unless given: a formatter never writes secrets it can recognise.
        self.redactor = redactor if redactor is not None else Redactor()
        self._clean_formats: dict[str, bool] = {}
        self.hostname = hostname or socket.gethostname()
        self._not_extra = _NOT_EXTRA | set(self.reserved_attrs) | set(RESERVED_ATTRS)

    def jsonify_log_record(self, log_data: dict[str, Any]) -> str:
        try:
            return super().jsonify_log_record(log_data)
        except (TypeError, ValueError):  # orjson: "Integer exceeds 64-bit range" and the like
            plain = self.redactor.fields(log_data)
            return json.dumps(plain, ensure_ascii=True, allow_nan=False, default=str)

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

    def _message(self, record: logging.LogRecord) -> str:
        """The message, scrubbed. Most calls format numbers into a constant format string, and
        digits cannot complete a secret's shape: those skip the scrub when the format string
        is known to hold no hint of one."""
        msg, args = record.msg, record.args
        if args and type(msg) is str:
            clean = self._clean_formats.get(msg)
            if clean is None:
                clean = not self.redactor.text.hint(msg)
                if len(self._clean_formats) >= _FORMATS_CACHED:
                    self._clean_formats.clear()
                self._clean_formats[msg] = clean
            if clean:
                for arg in args if type(args) is tuple else (args,):
                    if type(arg) is not int and type(arg) is not float:
                        break
                else:
                    return record.message
        return self.redactor.text(record.message)

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        log_data["@timestamp"] = _timestamp(record.created)
        log_data["log.level"] = record.levelname.lower()
        scrub = self.redactor.text
        log_data["message"] = self._message(record)
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
                "message": scrub(_text(exc)),
                "stack_trace": scrub("".join(traceback.format_exception(exc_type, exc, tb))),
            }
        elif record.stack_info:  # logger.info(..., stack_info=True)
            log_data["error"] = {"stack_trace": scrub(record.stack_info)}
        fields = self.redactor.fields
        extras = self._extras(record)
        if extras:
            merge(log_data, fields(extras))
        task = getattr(record, TASK_ATTR, None)
        if task:
            merge(log_data, {"celery": {"task": dict(task)}})
        traced = trace_fields()
        if traced:
            merge(log_data, traced)
        ecs = getattr(record, ECS_ATTR, None)
        if isinstance(ecs, dict):
            merge(log_data, ecs if getattr(record, REDACTED_ATTR, False) else fields(ecs))
        if message_dict:  # logger.info({...}) style records
            merge(log_data, fields(message_dict))
