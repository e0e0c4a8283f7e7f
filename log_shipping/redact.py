"""Task arguments made safe to ship: values under sensitive keys redacted, long values cut.

Arguments are off by default; when they are on, a value whose key matches any pattern
(case-insensitive substring) is replaced, at any depth, and strings longer than the limit are
truncated with a marker saying how much was cut.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

DEFAULT_PATTERNS = (
    "password",
    "passwd",
    "secret",
    "token",
    "authorization",
    "api_key",
    "apikey",
    "private_key",
    "credential",
    "cookie",
    "session",
)
REDACTED = "[REDACTED]"


class Redactor:
    def __init__(
        self, patterns: Iterable[str] = DEFAULT_PATTERNS, max_length: int = 256, max_depth: int = 6
    ) -> None:
        self.patterns = tuple(p.lower() for p in patterns)
        self.max_length = max_length
        self.max_depth = max_depth

    def sensitive(self, key: object) -> bool:
        lowered = str(key).lower()
        return any(pattern in lowered for pattern in self.patterns)

    def __call__(self, value: Any, depth: int = 0) -> Any:
        if depth > self.max_depth:
            return "[...]"
        if isinstance(value, dict):
            return {
                str(k): REDACTED if self.sensitive(k) else self(v, depth + 1)
                for k, v in value.items()
            }
        if isinstance(value, (list, tuple, set, frozenset)):
            return [self(v, depth + 1) for v in value]
        if isinstance(value, (int, float, bool)) or value is None:
            return value
        text = value if isinstance(value, str) else repr(value)
        if len(text) > self.max_length:
            cut = len(text) - self.max_length
            return f"{text[: self.max_length]}...[{cut} more chars]"
        return text
