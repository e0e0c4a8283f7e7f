"""Which task is running: every log line written meanwhile carries its id and name.

A context variable (per thread, so the threads pool works too) is set on task_prerun and
restored on task_postrun; a logging filter copies it onto each record, whoever logged it:
`get_task_logger`, plain `logging`, or `print` redirected by Celery. Restored, not cleared: a
task run eagerly inside another (`.apply()`) hands the outer task's context back when it ends.
A line of Celery's own that names a task (task_lines.py) carries that task instead: the main
process logs about tasks while none runs in it.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar, Token
from typing import Any

from .formatter import ECS_ATTR, TASK_ATTR
from .task_lines import event_of, task_named_by

current_task: ContextVar[dict[str, Any] | None] = ContextVar("celery_obs_task", default=None)


def enter(task: dict[str, Any]) -> Token[dict[str, Any] | None]:
    """`task` is running: returns the token that `leave` takes to restore what was before."""
    return current_task.set(task)


def leave(token: Token[dict[str, Any] | None] | None) -> None:
    """The task `token` came from has ended: back to the task that was running before it (an
    outer one, or none). Without a token, or with one from another thread or used already,
    no task is running any more."""
    if token is not None:
        try:
            current_task.reset(token)
            return
        except (ValueError, RuntimeError):  # another context's token, or one used already
            pass
    current_task.set(None)


class TaskContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if hasattr(record, TASK_ATTR):
            return True
        task = None
        if record.name.startswith("celery.") and not record.name.startswith("celery.task"):
            task = task_named_by(record)
            event = event_of(record) if task is not None else None
            if event is not None and not hasattr(record, ECS_ATTR):
                setattr(record, ECS_ATTR, {"event": dict(event)})
        if task is None:
            task = current_task.get()
        if task is not None:
            setattr(record, TASK_ATTR, task)
        return True
