"""One structured log record per task lifecycle step, from Celery's signals.

task_prerun / task_success / task_failure / task_retry fire in the process that runs the task
(a prefork pool child); task_revoked, task_rejected, task_unknown and the failure a hard time
limit reports fire in the worker's main process. Receiving a task is Celery's own line, made a
record by task_lines (a second record per task would cost the main process, the prefork
worker's bottleneck, a tenth of its throughput). A hard time limit can send
task_failure twice for one task, so failures are reported once per task id (a small memory of
recent ones). The task context (context.py) is restored on task_postrun to what it was before
task_prerun, so a task applied eagerly inside another leaves the outer one's context in place.
"""

from __future__ import annotations

import inspect
import logging
import time
from typing import Any

from celery import signals
from celery.exceptions import TimeLimitExceeded

from . import task_lines
from .context import enter, leave
from .formatter import ECS_ATTR, REDACTED_ATTR
from .redact import Redactor
from .task_lines import RECENT as _RECENT
from .task_lines import Recent as _Recent

logger = logging.getLogger("celery_obs.lifecycle")


def _time_limit_ns(exception: Any) -> int | None:
    """A hard time limit's failure is reported by the main process, which did not see the task
    start; the pool kills it when the limit has run out since it started, so its runtime is
    the limit (TimeLimitExceeded's argument, in seconds)."""
    if not isinstance(exception, TimeLimitExceeded) or not exception.args:
        return None
    limit = exception.args[0]
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0:
        return None
    return int(limit * 1e9)


class Lifecycle:
    def __init__(self, redactor: Redactor | None, level: int = logging.INFO) -> None:
        self.redactor = redactor  # None: task arguments are not logged
        self.level = level
        self._started: _Recent = _Recent()
        self._failed: _Recent = _Recent()
        self._tokens: _Recent = _Recent()  # task id -> the token restoring the outer context
        self._params: dict[str, tuple[str, ...]] = {}  # task name -> positional parameter names

    def _receivers(self) -> list[tuple[Any, Any]]:
        return [
            (signals.task_received, self.on_received),
            (signals.task_prerun, self.on_prerun),
            (signals.task_postrun, self.on_postrun),
            (signals.task_success, self.on_success),
            (signals.task_failure, self.on_failure),
            (signals.task_retry, self.on_retry),
            (signals.task_revoked, self.on_revoked),
            (signals.task_rejected, self.on_rejected),
            (signals.task_unknown, self.on_unknown),
            (signals.task_internal_error, self.on_internal_error),
        ]

    def connect(self) -> None:
        for signal, handler in self._receivers():
            signal.connect(handler, weak=False)

    def disconnect(self) -> None:
        for signal, handler in self._receivers():
            signal.disconnect(handler)

    # -- record building ----------------------------------------------------------------------

    def _emit(
        self,
        level: int,
        message: str,
        action: str,
        outcome: str,
        task: dict[str, Any],
        duration_ns: int | None = None,
        exc_info: Any = None,
    ) -> None:
        event: dict[str, Any] = {
            "kind": "event",
            "category": ["process"],
            "action": action,
            "outcome": outcome,
        }
        if duration_ns is not None:
            event["duration"] = duration_ns
        worker = task.pop("worker_hostname", None)
        fields: dict[str, Any] = {"event": event, "celery": {"task": task}}
        if worker:
            fields["celery"]["worker"] = {"hostname": worker}
        # Safe already: arguments went through the redactor, the rest is Celery's own ids and
        # names; the message and the exception are scrubbed by the formatter.
        logger.log(level, message, extra={ECS_ATTR: fields, REDACTED_ATTR: True}, exc_info=exc_info)

    def _param_names(self, task: Any) -> tuple[str, ...]:
        """The task function's positional parameter names, so that `login.delay("bob", "pw")`
        for `def login(user, password)` has its password redacted like a keyword would be."""
        name = getattr(task, "name", None)
        if not isinstance(name, str):
            return ()
        names = self._params.get(name)
        if names is None:
            try:  # `run` is bound for bind=True tasks: `self` is not among the parameters
                parameters = inspect.signature(task.run).parameters.values()
                names = tuple(
                    p.name
                    for p in parameters
                    if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                )
            except Exception:  # not a task, no signature: values are still scrubbed
                names = ()
            if len(self._params) < _RECENT:
                self._params[name] = names
        return names

    def _task_fields(
        self,
        task_id: str | None,
        name: str | None,
        request: Any,
        state: str,
        task: Any = None,
    ) -> dict[str, Any]:
        fields: dict[str, Any] = {"id": task_id, "name": name, "state": state}
        if request is not None:
            delivery = getattr(request, "delivery_info", None) or {}
            fields["queue"] = delivery.get("routing_key") or delivery.get("exchange") or None
            for attr in ("retries", "root_id", "parent_id"):
                value = getattr(request, attr, None)
                if value is not None:
                    fields[attr] = value
            if fields.get("parent_id") == task_id:
                # A retry is sent from inside the attempt, so Celery makes a task without a
                # parent its own parent: no task is its own parent.
                del fields["parent_id"]
            # A group's (and a chord header's) members share the group id; a chord header
            # member also knows the callback that runs after the whole header.
            group = getattr(request, "group", None)
            if isinstance(group, str) and group:
                fields["group_id"] = group
            chord = getattr(request, "chord", None)
            if isinstance(chord, dict):
                callback = (chord.get("options") or {}).get("task_id")
                if isinstance(callback, str) and callback:
                    fields["chord_callback_id"] = callback
            eta = getattr(request, "eta", None)
            if eta:
                fields["eta"] = eta if isinstance(eta, str) else eta.isoformat()
            hostname = getattr(request, "hostname", None)
            if hostname:
                fields["worker_hostname"] = hostname
            if self.redactor is not None:
                args = list(getattr(request, "args", None) or [])
                fields["args"] = self.redactor.args(args, self._param_names(task))
                fields["kwargs"] = self.redactor(dict(getattr(request, "kwargs", None) or {}))
        return {k: v for k, v in fields.items() if v is not None}

    def _duration(self, task_id: str | None) -> int | None:
        started = self._started.pop(task_id, None) if task_id else None
        return None if started is None else time.monotonic_ns() - started

    # -- signal handlers ----------------------------------------------------------------------

    def on_received(self, sender: Any = None, request: Any = None, **_: Any) -> None:
        """The worker took the message (main process). Celery logs that itself, and
        task_lines makes its line the `task-received` record; remembered here so that the
        control commands' lines, which name only the id, get the name too."""
        task_id, name = getattr(request, "id", None), getattr(request, "name", None)
        if isinstance(task_id, str) and isinstance(name, str):
            task_lines.remember(task_id, name)

    def on_prerun(
        self, sender: Any = None, task_id: str | None = None, task: Any = None, **_: Any
    ) -> None:
        name = getattr(task, "name", None)
        token = enter({"id": task_id, "name": name})
        if task_id:
            self._tokens.remember(task_id, token)
            self._started.remember(task_id, time.monotonic_ns())
        fields = self._task_fields(task_id, name, getattr(task, "request", None), "STARTED", task)
        self._emit(self.level, f"Task {name}[{task_id}] started", "task-started", "unknown", fields)

    def on_postrun(self, sender: Any = None, task_id: str | None = None, **_: Any) -> None:
        leave(self._tokens.pop(task_id, None) if task_id else None)

    def on_success(
        self, sender: Any = None, result: Any = None, runtime: float | None = None, **_: Any
    ) -> None:
        request = getattr(sender, "request", None)
        task_id = getattr(request, "id", None)
        fields = self._task_fields(
            task_id, getattr(sender, "name", None), request, "SUCCESS", sender
        )
        duration = self._duration(task_id)
        if runtime is not None:
            fields["runtime"] = runtime
        elif duration is not None:
            fields["runtime"] = duration / 1e9
        self._emit(
            self.level,
            f"Task {fields.get('name')}[{task_id}] succeeded",
            "task-succeeded",
            "success",
            fields,
            duration,
        )

    def on_failure(
        self,
        sender: Any = None,
        task_id: str | None = None,
        exception: Any = None,
        einfo: Any = None,
        **_: Any,
    ) -> None:
        # Celery's "Task handler raised error" line follows with this very exception.
        task_lines.failed(exception, task_id, getattr(sender, "name", None))
        if task_id in self._failed:  # a hard time limit reports some failures twice
            return
        if task_id:
            self._failed.remember(task_id, True)
        request = getattr(sender, "request", None)
        name = getattr(sender, "name", None)
        fields = self._task_fields(task_id, name, request, "FAILURE", sender)
        duration = self._duration(task_id)
        if duration is None:
            duration = _time_limit_ns(exception)
        if duration is not None:
            fields["runtime"] = duration / 1e9
        exc_info = (type(exception), exception, getattr(einfo, "tb", None)) if exception else None
        self._emit(
            logging.ERROR,
            f"Task {name}[{task_id}] failed: {exception!r}",
            "task-failed",
            "failure",
            fields,
            duration,
            exc_info,
        )

    def on_retry(
        self, sender: Any = None, request: Any = None, reason: Any = None, **_: Any
    ) -> None:
        task_id = getattr(request, "id", None)
        name = getattr(sender, "name", None)
        fields = self._task_fields(task_id, name, request, "RETRY", sender)
        self._emit(
            logging.WARNING,
            f"Task {name}[{task_id}] retry: {reason}",
            "task-retried",
            "failure",
            fields,
            self._duration(task_id),
        )

    def on_revoked(
        self,
        sender: Any = None,
        request: Any = None,
        terminated: bool = False,
        signum: Any = None,
        expired: bool = False,
        **_: Any,
    ) -> None:
        task_id = getattr(request, "id", None)
        name = getattr(request, "task_name", None) or getattr(sender, "name", None)
        fields = self._task_fields(task_id, name, request, "REVOKED", sender)
        fields.update(terminated=bool(terminated), expired=bool(expired))
        self._emit(
            logging.WARNING, f"Task {name}[{task_id}] revoked", "task-revoked", "failure", fields
        )

    def on_rejected(
        self, sender: Any = None, message: Any = None, exc: Any = None, **_: Any
    ) -> None:
        headers = getattr(message, "headers", None) or {}
        task_id, name = headers.get("id"), headers.get("task")
        fields = self._task_fields(task_id, name, None, "REJECTED")
        self._emit(
            logging.WARNING,
            f"Task {name}[{task_id}] rejected: {exc!r}",
            "task-rejected",
            "failure",
            fields,
        )

    def on_unknown(
        self, sender: Any = None, name: str | None = None, id: str | None = None, **_: Any
    ) -> None:
        fields = self._task_fields(id, name, None, "FAILURE")
        self._emit(
            logging.ERROR,
            f"Received unregistered task {name}[{id}]",
            "task-unknown",
            "failure",
            fields,
        )

    def on_internal_error(
        self,
        sender: Any = None,
        task_id: str | None = None,
        request: Any = None,
        exception: Any = None,
        einfo: Any = None,
        **_: Any,
    ) -> None:
        name = getattr(sender, "name", None)
        fields = self._task_fields(task_id, name, request, "FAILURE", sender)
        exc_info = (type(exception), exception, getattr(einfo, "tb", None)) if exception else None
        self._emit(
            logging.ERROR,
            f"Internal error in task {name}[{task_id}]: {exception!r}",
            "task-internal-error",
            "failure",
            fields,
            exc_info=exc_info,
        )
