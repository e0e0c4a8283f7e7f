"""The worker's console as JSON lines: no plain-text banner, shutdown notices as records.

A container log collector reads the process's stdout. Left alone, a worker writes there an
18-31-line plain-text banner and, on a signal, "worker: Warm shutdown (MainProcess)", while its
log lines go to stderr. With `install()`:

- Celery sends `celeryd_after_setup` with the worker just before it prints the banner: we mark
  the worker quiet (no banner) and log one `worker started` record holding what the banner
  said (versions, node name, transport with credentials masked, pool, concurrency, queues,
  tasks).
- The notices Celery writes from its signal handlers (`celery.apps.worker.safe_say`) are
  written as one JSON record each, to the stream Celery chose, with a single `os.write` like
  Celery's own (a signal handler must not take logging's locks).
- Celery's console handler (stderr, when there is no `--logfile`) is replaced by the local
  outputs (`stdout` by default): see `JsonLogging.apply`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import sys
from collections.abc import Callable
from typing import Any, TextIO

import celery
from celery import signals

from .formatter import ECS_ATTR

logger = logging.getLogger("celery_obs.worker")


def _pool_name(worker: Any) -> str:
    pool = getattr(worker, "pool_cls", None)
    if pool is None:
        return "unknown"
    name = pool if isinstance(pool, str) else getattr(pool, "__module__", str(pool))
    return name.split(".")[-1].split(":")[0]


def _concurrency(worker: Any) -> dict[str, Any]:
    autoscale = getattr(worker, "autoscale", None)
    if autoscale:
        most, least = autoscale
        return {"min": least, "max": most}
    return {"processes": getattr(worker, "concurrency", None)}


def _uri(make: Callable[[], Any]) -> str | None:
    """The URI of a connection or result backend `make` builds, without its password (kombu
    and Celery mask it; the formatter scrubs credentials by shape on top). Building it may
    fail (a backend whose client library is missing): the worker runs on, so does the record,
    without the field."""
    try:
        return str(make().as_uri())
    except Exception:
        return None


def started_fields(worker: Any) -> dict[str, Any]:
    """What Celery's banner says, as ECS fields."""
    app = worker.app
    queues = sorted(getattr(app.amqp, "queues", {}) or {})
    tasks = sorted(name for name in app.tasks if not name.startswith("celery."))
    return {
        "event": {"kind": "event", "category": ["process"], "action": "worker-started"},
        "celery": {
            "version": celery.__version__,
            "worker": {
                "hostname": worker.hostname,
                "pool": _pool_name(worker),
                "concurrency": _concurrency(worker),
                "queues": queues,
                "events": bool(getattr(worker, "task_events", False)),
            },
            "app": app.main or "__main__",
            "broker": {"transport": _uri(app.connection)},
            "result_backend": _uri(lambda: app.backend),
            "tasks": tasks,
        },
        "host": {"os": {"full": platform.platform()}},
    }


def on_after_setup(sender: Any = None, instance: Any = None, **_: Any) -> None:
    """`celeryd_after_setup`: the banner becomes one record."""
    if instance is None:
        return
    instance.quiet = True  # Worker.on_start prints the banner unless quiet, right after this
    logger.info("worker %s started", instance.hostname, extra={ECS_ATTR: started_fields(instance)})


class ConsoleNotices:
    """Replaces `celery.apps.worker.safe_say`: the same notices, as JSON records."""

    def __init__(self, formatter: logging.Formatter) -> None:
        self.formatter = formatter

    def __call__(self, msg: str, f: TextIO | None = sys.__stderr__) -> None:
        if f is None:
            return
        record = logging.LogRecord(
            "celery.apps.worker", logging.INFO, __file__, 0, str(msg).strip(), None, None
        )
        try:
            line = self.formatter.format(record) + "\n"
            fd = f.fileno()
        except Exception:  # Celery's own says: losing a notice must never abort the caller
            return
        with contextlib.suppress(OSError):
            _write(fd, line.encode("utf-8", "replace"))


def _write(fd: int, data: bytes) -> None:
    # Celery keeps the unpatched os.write for eventlet/gevent workers; use the same.
    from celery.apps import worker as apps_worker

    write = getattr(apps_worker, "_original_os_write", os.write)
    write(fd, data)


def connect(formatter: logging.Formatter) -> None:
    from celery.apps import worker as apps_worker

    signals.celeryd_after_setup.connect(on_after_setup, weak=False)
    if hasattr(apps_worker, "safe_say"):
        apps_worker.safe_say = ConsoleNotices(formatter)
