"""`install(app)`: JSON logs and lifecycle records for a Celery app, in one call.

Celery configures the worker's loggers itself (root and `celery.task`, hijacked or not); once it
has, the `after_setup_logger` / `after_setup_task_logger` signals hand us each logger and we put
the ECS JSON formatter and the task-context filter on its handlers (adding one on the chosen
output if it has none). So Celery's own lines, task loggers, plain `logging` and redirected
`print` all come out as JSON. Every option has a `CELERY_OBS_LOG_*` environment variable, so a
deployment can change them without code.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from celery import Celery, signals
from celery.utils.log import get_multiprocessing_logger

from .context import TaskContextFilter
from .formatter import EcsJsonFormatter
from .lifecycle import Lifecycle
from .redact import DEFAULT_PATTERNS, Redactor

ENV_PREFIX = "CELERY_OBS_LOG_"


@dataclass(frozen=True)
class LogConfig:
    service_name: str = "celery"
    #: "stdout", "stderr" or "file:/path/to/worker.log" (rotated).
    output: str = "stdout"
    level: str = "INFO"
    include_args: bool = False
    redact: tuple[str, ...] = DEFAULT_PATTERNS
    max_value_length: int = 256
    file_max_bytes: int = 50 * 1024 * 1024
    file_backups: int = 5
    extra: Mapping[str, Any] = field(default_factory=dict)


def _bool(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


def config_from_env(environ: Mapping[str, str], base: LogConfig) -> LogConfig:
    """Environment variables override what the code passed to install()."""
    values: dict[str, Any] = {}
    parse: dict[str, Callable[[str], Any]] = {
        "service_name": str,
        "output": str,
        "level": str.upper,
        "include_args": _bool,
        "redact": lambda t: tuple(p.strip() for p in t.split(",") if p.strip()),
        "max_value_length": int,
    }
    for name, convert in parse.items():
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw:
            values[name] = convert(raw)
    return LogConfig(**{**base.__dict__, **values})


def make_handler(config: LogConfig) -> logging.Handler:
    if config.output.startswith("file:"):
        return logging.handlers.RotatingFileHandler(
            config.output[len("file:") :],
            maxBytes=config.file_max_bytes,
            backupCount=config.file_backups,
            encoding="utf-8",
        )
    if config.output in ("stdout", "stderr"):
        # sys.__stdout__: Celery redirects sys.stdout into logging; writing there would loop.
        return logging.StreamHandler(
            sys.__stdout__ if config.output == "stdout" else sys.__stderr__
        )
    raise ValueError(f"log output must be stdout, stderr or file:PATH, got {config.output!r}")


class JsonLogging:
    """Applies the formatter and filter to whatever loggers Celery sets up."""

    def __init__(self, config: LogConfig) -> None:
        self.config = config
        self.formatter = EcsJsonFormatter(service_name=config.service_name)
        self.filter = TaskContextFilter()

    def apply(self, logger: logging.Logger, **_: Any) -> None:
        if not logger.handlers:
            logger.addHandler(make_handler(self.config))
        for handler in logger.handlers:
            handler.setFormatter(self.formatter)
            if self.filter not in handler.filters:
                handler.addFilter(self.filter)
        logger.setLevel(self.config.level)

    def apply_root(self, logger: logging.Logger, **kwargs: Any) -> None:
        self.apply(logger, **kwargs)
        # Celery gives the pool's multiprocessing logger a handler of its own ("Process
        # 'ForkPoolWorker-1' exited with signal 9") and sends no signal for it.
        pool_logger = get_multiprocessing_logger()
        if pool_logger.handlers:
            level = pool_logger.level
            self.apply(pool_logger)
            pool_logger.setLevel(level)

    def connect(self) -> None:
        signals.after_setup_logger.connect(self.apply_root, weak=False)
        signals.after_setup_task_logger.connect(self.apply, weak=False)


_installed: list[tuple[JsonLogging, Lifecycle]] = []


def install(
    app: Celery | None = None,
    service_name: str | None = None,
    *,
    output: str | None = None,
    level: str | None = None,
    include_args: bool | None = None,
    redact: Iterable[str] | None = None,
    max_value_length: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> LogConfig:
    """Turn the worker's logs into ECS JSON and log every task lifecycle step.

    Call it once in the module that defines the Celery app. Keyword arguments override the
    defaults; `CELERY_OBS_LOG_*` environment variables override both. Returns the config used.
    Calling it again is a no-op (it returns the first config).
    """
    if _installed:
        return _installed[0][0].config
    base = LogConfig()
    given = {
        "service_name": service_name or (app.main if app is not None and app.main else None),
        "output": output,
        "level": level.upper() if level else None,
        "include_args": include_args,
        "redact": tuple(redact) if redact is not None else None,
        "max_value_length": max_value_length,
    }
    config = LogConfig(**{**base.__dict__, **{k: v for k, v in given.items() if v is not None}})
    config = config_from_env(os.environ if environ is None else environ, config)
    make_handler(config).close()  # a bad output fails here, at import, not in the worker
    json_logging = JsonLogging(config)
    json_logging.connect()
    # Python warnings (Celery's own included) become log records, hence JSON, too.
    logging.captureWarnings(True)
    redactor = Redactor(config.redact, config.max_value_length) if config.include_args else None
    lifecycle = Lifecycle(redactor, level=logging.getLevelName(config.level))
    lifecycle.connect()
    _installed.append((json_logging, lifecycle))
    return config
