"""Secrets taken out of what a record carries: by key in every mapping shape, by value in text.

By key: a value whose key contains one of the patterns is replaced by `[REDACTED]`, at any depth.
Keys are compared case-insensitively with `-`, `_`, `.` and spaces ignored, so `api_key` matches
`X-Api-Key`, `x_api_key`, `api.key` and `APIKEY`. Mappings are dicts and any other `Mapping`,
namedtuples and dataclass instances (their fields, not a repr), and lists or tuples of pairs
(`[("Authorization", "Bearer ...")]`, `[["password", "x"]]`); in a list of strings, the item
after a `-`-prefixed sensitive flag (`["--password", "x"]`) is a value too.
By value: every string, at any depth, goes through `scrub.TextScrubber` (credentials in URLs,
`key=value`, bearer tokens...).

`redactor(value)` is for task arguments: it also cuts long strings and collections and turns ints
beyond 64 bits into strings. `redactor.fields(value)` is for a record's own fields (`extra=`):
nothing is cut, and a container that contains itself becomes `"[circular]"` instead of losing
the record. `redactor.text(s)` scrubs one string (messages, exceptions, stack traces).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from itertools import islice
from typing import Any

from pythonjsonlogger.json import JsonEncoder

from .scrub import REDACTED, SEPARATORS, TextScrubber

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
#: The key of the marker entry that ends a mapping with more than `max_items` items.
MORE = "[...]"
CIRCULAR = "[circular]"
#: The ints Elasticsearch stores as numbers (`long`); others are written as strings.
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
_UNSEPARATE = str.maketrans("", "", SEPARATORS)
_SCALARS = (bool, type(None))
_KEY_CACHE = 4096  # distinct keys remembered per redactor (keys repeat: field names)


def int_text(value: int) -> str:
    """An int as text, even one longer than `sys.get_int_max_str_digits()` allows."""
    try:
        return str(value)
    except ValueError:
        return f"[{value.bit_length()}-bit int]"


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
        self.patterns = tuple(p.lower().translate(_UNSEPARATE) for p in patterns if p.strip())
        self.text = TextScrubber(patterns)
        self.max_length = max_length
        self.max_depth = max_depth
        self.max_items = max_items
        self._sensitive: dict[str, bool] = {}

    def sensitive(self, key: object) -> bool:
        name = key if isinstance(key, str) else str(key)
        known = self._sensitive.get(name)
        if known is None:
            plain = name.lower().translate(_UNSEPARATE)
            known = any(pattern in plain for pattern in self.patterns)
            if len(self._sensitive) >= _KEY_CACHE:
                self._sensitive.clear()
            self._sensitive[name] = known
        return known

    # -- task arguments: redacted and cut -----------------------------------------------------

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
            if self._is_secret_pair(value):
                return [self(value[0], depth + 1), REDACTED]  # type: ignore[index]
            items = self._sequence(list(islice(value, self.max_items)), depth)
            if len(value) > self.max_items:
                items.append(self._more(len(value)))
            return items
        if isinstance(value, (*_SCALARS, float)):
            return value
        if isinstance(value, int):
            return value if INT_MIN <= value <= INT_MAX else self._cut(int_text(value))
        if isinstance(value, (bytes, bytearray, memoryview)):
            size = len(value) if not isinstance(value, memoryview) else value.nbytes
            head = self.text(repr(bytes(value[: self.max_length])))
            if size > self.max_length or len(head) > self.max_length:
                return f"{head[: self.max_length]}...[{size} bytes]"
            return head
        if isinstance(value, str):
            return self._cut(self.text(value))
        try:
            text = repr(value)
        except Exception:  # a broken __repr__ must not cost the task its record
            text = f"<{type(value).__name__}>"
        return self._cut(self.text(text))

    def _sequence(self, values: list[Any], depth: int) -> list[Any]:
        out = []
        after_flag = False
        for value in values:
            out.append(REDACTED if after_flag else self(value, depth + 1))
            after_flag = self._is_secret_flag(value)
        return out

    def args(self, args: Sequence[Any], names: Sequence[str] = ()) -> list[Any]:
        """Positional arguments, the ones whose parameter name (`names`, in order) is
        sensitive redacted whole: `login("bob", "hunter2")` for `def login(user, password)`."""
        out: list[Any] = self(list(args))
        for i, name in enumerate(names[: len(out)]):
            if self.sensitive(name):
                out[i] = REDACTED
        return out

    def _is_secret_pair(self, value: Any) -> bool:
        return (
            isinstance(value, (list, tuple))
            and len(value) == 2
            and isinstance(value[0], str)
            and self.sensitive(value[0])
        )

    def _is_secret_flag(self, value: Any) -> bool:
        return isinstance(value, str) and value.startswith("-") and self.sensitive(value)

    # -- a record's own fields: redacted, never cut, cycles marked ----------------------------

    def fields(self, value: Any, depth: int = 0, path: frozenset[int] = frozenset()) -> Any:
        """`value` made safe to ship and plain to write: dicts, lists, str, int, float, bool,
        None. Objects an encoder would write as text (datetimes, exceptions...) are that text,
        scrubbed."""
        if isinstance(value, str):
            return self.text(value)
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, int):
            return value if INT_MIN <= value <= INT_MAX else int_text(value)
        if isinstance(value, float):
            return value if math.isfinite(value) else None
        if depth >= 100:  # orjson's own limit is 254
            return "[...]"
        if id(value) in path:
            return CIRCULAR
        inner = path | {id(value)}
        mapping = value if isinstance(value, Mapping) else _fields(value)
        if mapping is not None:
            return {
                (k if isinstance(k, str) else str(self.fields(k, depth + 1, inner))): (
                    REDACTED if self.sensitive(k) else self.fields(v, depth + 1, inner)
                )
                for k, v in mapping.items()
            }
        if isinstance(value, (list, tuple, set, frozenset)):
            if self._is_secret_pair(value):
                return [self.fields(value[0], depth + 1, inner), REDACTED]  # type: ignore[index]
            out = []
            after_flag = False
            for item in value:
                out.append(REDACTED if after_flag else self.fields(item, depth + 1, inner))
                after_flag = self._is_secret_flag(item)
            return out
        if isinstance(value, (bytes, bytearray, memoryview)):
            # As text, not base64: a secret in bytes is a secret still, and scrubbed as text.
            return self.text(bytes(value).decode("utf-8", "backslashreplace"))
        try:
            converted = JsonEncoder().default(value)
        except Exception:  # a broken __str__ or __repr__: the record still goes out
            converted = f"<{type(value).__name__}>"
        return self.fields(converted, depth + 1, inner)
