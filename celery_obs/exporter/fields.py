"""Read the fields of Celery events as they really arrive: any sender may put anything in them."""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone

from .metrics import UNKNOWN_LABEL

_CALL_REPR = re.compile(r"([A-Za-z_][\w.]*)\(")
_TRACEBACK_TAIL = re.compile(r"([A-Za-z_][\w.]*)(?::|$)")
_WRAPPERS = frozenset({"ExceptionWithTraceback", "ExceptionInfo"})
_NOT_REGISTERED = re.compile(r"NotRegistered\((['\"])(.+)\1\)")


def timestamp(value: object) -> float | None:
    """A usable event time: a finite number (bools, strings, NaN and infinities are not)."""
    if type(value) is float:
        return value if math.isfinite(value) else None
    if type(value) is int:
        try:
            return float(value)
        except OverflowError:  # an int past float range
            return None
    return None


def parse_eta(value: object) -> float | None:
    """ETA/countdown as a Unix timestamp; Celery sends ISO 8601 (naive means UTC)."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def exception_class(exception: object, traceback: object = None) -> str:
    """The exception's class name, e.g. `"ValueError('boom')"` -> `"ValueError"`.

    Celery's `exception` field is a safe_repr, usually `Class(args)`. Some failures repr
    differently (`Reject` as `reject requeue=False: ...`; a hard time limit in Celery 5.7 as
    `ExceptionWithTraceback()`), and then the traceback's closing `module.Class: message` line
    names the real class.
    """
    if isinstance(exception, str):
        match = _CALL_REPR.match(exception)
        if match and match.group(1) not in _WRAPPERS:
            return match.group(1).rpartition(".")[2]
    if isinstance(traceback, str):
        for line in reversed(traceback.rstrip().splitlines()[-5:]):
            match = _TRACEBACK_TAIL.match(line)
            if match:
                return match.group(1).rpartition(".")[2]
    return UNKNOWN_LABEL


def not_registered_name(exception: object) -> str | None:
    """The task name in a `NotRegistered('name')` failure (an unknown task's only event)."""
    if isinstance(exception, str):
        match = _NOT_REGISTERED.match(exception)
        if match:
            return match.group(2)
    return None
