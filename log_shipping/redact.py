"""Task arguments made safe to ship: values under sensitive keys redacted, long values cut.

Arguments are off by default; when they are on, a value whose key matches any pattern
(case-insensitive substring) is replaced, at any depth, and strings longer than the limit are
truncated with a marker saying how much was cut. Any mapping, namedtuple or dataclass instance
is a mapping here (so its sensitive fields are redacted too, not shipped inside a repr); long
collections keep their first items and a marker; ints beyond 64 bits become strings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from itertools import islice
from typing import Any

from .formatter import INT_MAX, INT_MIN, int_text

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
#: The key of the marker entry that ends a mapping with more than `max_items` items.
MORE = "[...]"


def _fields(value: Any) -> Mapping[Any, Any] | None:
    """A namedtuple or dataclass instance as a mapping of its fields (shallow: nested values
    are the redactor's to walk, and `dataclasses.asdict` would deep-copy every one)."""
    if isinstance(value, tuple) and hasattr(value, "_asdict"):
        return value._asdict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name, None) for f in dataclasses.fields(value)}
    return None


class Redactor:
    def __init__(
        self,
        patterns: Iterable[str] = DEFAULT_PATTERNS,
        max_length: int = 256,
        max_depth: int = 6,
        max_items: int = 50,
    ) -> None:
        self.patterns = tuple(p.lower() for p in patterns)
        self.max_length = max_length
        self.max_depth = max_depth
        self.max_items = max_items

    def sensitive(self, key: object) -> bool:
        lowered = str(key).lower()
        return any(pattern in lowered for pattern in self.patterns)

    def _more(self, size: int) -> str:
        return f"[... {size - self.max_items} more items]"

    def _cut(self, text: str) -> str:
        if len(text) > self.max_length:
            cut = len(text) - self.max_length
            return f"{text[: self.max_length]}...[{cut} more chars]"
        return text

    def __call__(self, value: Any, depth: int = 0) -> Any:
        if depth > self.max_depth:
            return "[...]"
        mapping = value if isinstance(value, Mapping) else _fields(value)
        if mapping is not None:
            out = {
                str(k): REDACTED if self.sensitive(k) else self(v, depth + 1)
                for k, v in islice(mapping.items(), self.max_items)
            }
            if len(mapping) > self.max_items:
                out[MORE] = self._more(len(mapping))
            return out
        if isinstance(value, (list, tuple, set, frozenset)):
            items = [self(v, depth + 1) for v in islice(value, self.max_items)]
            if len(value) > self.max_items:
                items.append(self._more(len(value)))
            return items
        if isinstance(value, bool) or value is None or isinstance(value, float):
            return value
        if isinstance(value, int):
            return value if INT_MIN <= value <= INT_MAX else self._cut(int_text(value))
        if isinstance(value, (bytes, bytearray, memoryview)):
            size = len(value) if not isinstance(value, memoryview) else value.nbytes
            head = repr(bytes(value[: self.max_length]))
            if size > self.max_length or len(head) > self.max_length:
                return f"{head[: self.max_length]}...[{size} bytes]"
            return head
        if isinstance(value, str):
            return self._cut(value)
        try:
            text = repr(value)
        except Exception:  # a broken __repr__ must not cost the task its record
            text = f"<{type(value).__name__}>"
        return self._cut(text)
