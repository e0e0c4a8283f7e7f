"""Which task a line of Celery's own names, for lines written outside any task's context.

The worker's main process logs many lines about one task ("Task X[id] received", time-limit
warnings, "Discarding revoked task: X[id]", "Terminating id (15)") while no task runs in it, so
the task context (context.py) cannot tell. Celery passes some lines' context as
`extra={"data": {"id": ..., "name": ...}}`; the others name the task in their arguments, in a
few documented formats: `%s[%s]` (name, id), or the id alone in the control commands' lines,
whose name we remember from when the worker received the task. Only ids and names are taken,
never the arguments' repr.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from functools import lru_cache
from typing import Any

#: A %-conversion of the printf-style format strings logging uses (`%%` is not one).
_CONVERSION = re.compile(r"%(?:\([^)]*\))?[#0 +-]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[diouxXeEfFgGcrsa]")
_NAME_ID = "%s[%s]"
#: Lines of celery.worker.control whose first argument is a task id.
_ID_FIRST = frozenset({"Terminating %s (%s)", "Failed to mark task %s as revoked in backend: %s"})
#: Its argument is the revoked ids, comma separated: about one task when there is one.
_REVOKED_IDS = "Tasks flagged as revoked: %s"


@lru_cache(maxsize=512)
def _name_id_position(msg: str) -> int | None:
    """Index in the arguments of the name in `...%s[%s]...`, or None."""
    at = msg.find(_NAME_ID)
    if at < 0:
        return None
    return len(_CONVERSION.findall(msg[:at].replace("%%", "")))


RECENT = 10_000  # task ids remembered (here and by the lifecycle records)


class Recent(OrderedDict):
    """A bounded mapping: the oldest entries go first."""

    def remember(self, key: str, value: Any) -> None:
        self[key] = value
        if len(self) > RECENT:
            self.popitem(last=False)


#: Task id -> name of the tasks this process received lately (lifecycle.on_received): the
#: control commands' lines name only the id, of a task running, prefetched or waiting for its
#: ETA here.
_RECEIVED = Recent()
remember = _RECEIVED.remember


def _task(task_id: Any, name: Any) -> dict[str, Any] | None:
    if not isinstance(task_id, str) or not task_id:
        return None
    task: dict[str, Any] = {"id": task_id}
    name = name if isinstance(name, str) and name else _RECEIVED.get(task_id)
    if name:
        task["name"] = name
    return task


#: Celery's line after a failure the main process handles (a hard time limit, a lost worker),
#: with the exception as its only argument: the exception task_failure just reported.
_HANDLER_ERROR = "Task handler raised error: %r"
#: (the exception, its task) of the last task_failure in this process: Celery logs the line
#: right after sending the signal, with the same exception object.
_last_failure: list[tuple[BaseException, dict[str, Any]]] = []


def failed(exception: Any, task_id: Any, name: Any) -> None:
    """task_failure was sent for `task_id` with `exception` (lifecycle.on_failure)."""
    task = _task(task_id, name)
    _last_failure[:] = [(exception, task)] if task and isinstance(exception, BaseException) else []


#: Celery's line for a task the worker received (celery.app.trace.LOG_RECEIVED).
_RECEIVED_LINE = "Task %(name)s[%(id)s] received"
#: What that line becomes: the `task-received` record (with task-started, the wait on the
#: worker), as the lifecycle records name their steps.
RECEIVED_EVENT = {"kind": "event", "category": ["process"], "action": "task-received"}


def event_of(record: logging.LogRecord) -> dict[str, Any] | None:
    """ECS `event` fields for a line of Celery's that is a lifecycle step, or None."""
    return RECEIVED_EVENT if record.msg == _RECEIVED_LINE else None


def task_named_by(record: logging.LogRecord) -> dict[str, Any] | None:
    """{"id": ..., "name": ...} of the task a Celery log line is about, or None."""
    data = getattr(record, "data", None)
    if isinstance(data, dict) and "id" in data:
        return _task(data.get("id"), data.get("name"))
    msg, args = record.msg, record.args
    if not isinstance(msg, str) or not isinstance(args, tuple) or not args:
        return None
    if msg in _ID_FIRST:
        return _task(args[0], None)
    if msg == _HANDLER_ERROR and _last_failure and args[0] is _last_failure[0][0]:
        task = _last_failure.pop()[1]
        return task
    if msg == _REVOKED_IDS:
        ids = str(args[0])
        return None if "," in ids else _task(ids.strip(), None)
    position = _name_id_position(msg)
    if position is not None and len(args) > position + 1:
        return _task(str(args[position + 1]), str(args[position]))
    return None
