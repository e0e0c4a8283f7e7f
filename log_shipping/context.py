"""Which task is running: every log line written meanwhile carries its id and name.

A context variable (per thread, so the threads pool works too) is set on task_prerun and
cleared on task_postrun; a logging filter copies it onto each record, whoever logged it:
`get_task_logger`, plain `logging`, or `print` redirected by Celery.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import Any

from .formatter import TASK_ATTR

current_task: ContextVar[dict[str, Any] | None] = ContextVar("celery_obs_task", default=None)


class TaskContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        task = current_task.get()
        if task is not None and not hasattr(record, TASK_ATTR):
            setattr(record, TASK_ATTR, task)
        return True
