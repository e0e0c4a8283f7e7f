"""Secrets inside free text, found by their shape and replaced before a line leaves the process.

Recognised, case-insensitively:

- credentials in URLs: `scheme://user:password@host` keeps the user, `scheme://token@host`
  loses the whole user part;
- a value after a key that looks secret: `password=x`, `api-key: x`, `"token": "x"`,
  `('password', 'x')`, `Authorization: Bearer x` (the key is matched like a mapping key, with
  `-`, `_`, `.`, a space or nothing between its words; the value is a quoted string, a
  bracketed group without nesting, or a run up to a space or one of `,;&'"()[]{}<>`);
- `Bearer <credential>` anywhere, and `Basic` / `ApiKey` followed by 8 or more credential
  characters (shorter words after "basic" are prose);
- the body of a PEM private key, and JSON Web Tokens (`eyJ...`).

This runs on every log message, so the common case (no hint of a secret) costs one `lower()`
and a few substring searches; the regular expressions run only on text that has a hint.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

REDACTED = "[REDACTED]"
#: Characters treated alike between the words of a key: `X-Api-Key`, `x_api_key`, `api.key`.
SEPARATORS = "-_. "
_SPLIT = re.compile(f"[{re.escape(SEPARATORS)}]+")
_CREDENTIAL = r"[a-z0-9\-._~+/]"
#: Schemes of the `Authorization` header, matched after a secret key (`Authorization: Token x`).
_SCHEMES = r"(?:bearer|basic|digest|token|apikey|negotiate)\s+"
_VALUE = (
    r"""(?:"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|\\"(?:[^"\\]|\\[^"])*\\\""""
    r"""|\{[^{}]*\}|\[[^\[\]]*\]|\([^()]*\)|[^\s,;&'"()\[\]{}<>\\]+)"""
)
#: userinfo is everything up to the last `@` of the authority, as urllib reads it.
_URL = re.compile(r"://([^\s/?#'\"<>]*)@")


def words(pattern: str) -> list[str]:
    return [w for w in _SPLIT.split(pattern.lower()) if w]


def _key_regex(patterns: Iterable[str]) -> str:
    alternatives = sorted(
        {f"[{re.escape(SEPARATORS)}]?".join(map(re.escape, words(p))) for p in patterns},
        key=len,
        reverse=True,
    )
    return "|".join(a for a in alternatives if a)


class TextScrubber:
    """`scrubber(text)`: `text` with the secrets it holds replaced by `[REDACTED]`."""

    def __init__(self, patterns: Iterable[str]) -> None:
        patterns = [p for p in patterns if words(p)]
        keys = _key_regex(patterns) or "(?!)"  # no patterns: no key ever matches
        # Each pass runs only on text holding one of its hints (lowercase substrings that any
        # match contains: the longest word of each key pattern appears whatever the separators).
        passes = [
            (
                {max(words(p), key=len) for p in patterns},
                # a secret key, its closing quote, a separator (a comma only between two quoted
                # items: a pair's repr), then the value, after an optional auth scheme
                rf"(?:{keys})[\w.\-]*(?:\\?[\"'])?"
                rf"(?:\s*(?:=>|[:=])\s*|(?<=[\"'])\s*,\s*(?=\\?[\"']))"
                rf"(?:{_SCHEMES})?(?P<secret>{_VALUE})",
            ),
            (
                {"bearer", "basic", "apikey"},
                rf"\b(?:bearer\s+|(?:basic|apikey)\s+(?={_CREDENTIAL}{{8}}))"
                rf"(?P<secret>{_CREDENTIAL}+=*)",
            ),
            (
                {"-----begin"},
                r"-----begin [a-z ]*private key-----(?P<secret>[\s\S]+?)(?=-----end|$)",
            ),
            ({"eyj"}, r"\b(?P<secret>eyj[\w-]{8,}\.eyj[\w-]{8,}\.[\w-]*)"),
        ]
        self._passes = [
            (_minimal(hints), re.compile(source), re.compile(source, re.IGNORECASE))
            for hints, source in passes
        ]
        self.hints = _minimal(set().union(*(hints for hints, _ in passes)))

    def hint(self, text: str) -> bool:
        """Whether `text` may hold a secret (False: it certainly holds none)."""
        if "://" in text:
            return True
        lowered = text.lower()
        return any(hint in lowered for hint in self.hints)

    def __call__(self, text: str) -> str:
        if "://" in text:
            text = _URL.sub(_url_credentials, text)
        lowered = text.lower()
        for hint in self.hints:
            if hint in lowered:
                break
        else:
            return text
        for hints, on_lowered, any_case in self._passes:
            if any(h in lowered for h in hints):
                if len(lowered) == len(text):  # each character lowered to one: same positions
                    matches = on_lowered.finditer(lowered)
                else:
                    matches = any_case.finditer(text)
                masked = _mask(text, matches)
                if masked is not text:
                    text, lowered = masked, masked.lower()
        return text


def _minimal(hints: set[str]) -> tuple[str, ...]:
    """The hints without those that contain another (`apikey` when `api` is one)."""
    return tuple(sorted(h for h in hints if not any(o != h and o in h for o in hints)))


def _mask(text: str, matches: Iterable[re.Match[str]]) -> str:
    out: list[str] = []
    done = 0
    for match in matches:
        start, end = match.span("secret")
        out.append(text[done:start])
        out.append(_masked(text[start:end]))
        done = end
    if not out:
        return text
    out.append(text[done:])
    return "".join(out)


def _masked(value: str) -> str:
    """The value replaced, its quotes (or brackets) kept so the text around still reads."""
    if len(value) >= 2 and value[0] in "\"'" and value[-1] == value[0]:
        return f"{value[0]}{REDACTED}{value[0]}"
    if value.startswith('\\"') and value.endswith('\\"') and len(value) >= 4:
        return f'\\"{REDACTED}\\"'
    return REDACTED


def _url_credentials(match: re.Match[str]) -> str:
    user, colon, _ = match.group(1).partition(":")
    if not colon:
        return f"://{REDACTED}@"
    return f"://{user}:{REDACTED}@"
