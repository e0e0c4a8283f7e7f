"""Structured ECS JSON logs from inside Celery workers: `log_shipping.install(app)`.

Every log line a worker writes becomes one JSON object with ECS field names, lines written while
a task runs carry its id and name, and every lifecycle step of every task (started, succeeded,
failed, retried, revoked, rejected, unknown) is a record of its own.
"""

from .formatter import EcsJsonFormatter
from .hooks import LogConfig, install
from .redact import Redactor

__all__ = ["EcsJsonFormatter", "LogConfig", "Redactor", "install"]
