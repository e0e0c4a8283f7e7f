"""Keep the broker's credentials out of everything the exporter prints or serves.

`mask_url` shows a broker URL with every password masked, for every form Celery and kombu
accept: failover lists (`url1;url2`, as kombu splits them), sentinel URLs, passwords holding
`@` or `/`, secrets in the query string (`?password=`), URLs urllib cannot parse. It never
raises: a URL it cannot make sense of is shown as its scheme only.

`Scrubber` is the second line: it knows the secret strings themselves (passwords, secret query
values, secret-looking transport options) and replaces them wherever they appear, so a library's
error message or log line that quotes one is masked too. It is installed as a logging filter and
applied to the reason `/healthz` serves.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from urllib.parse import parse_qsl, unquote, urlencode

MASK = "**"
#: Query parameters and transport options whose values are secrets.
SECRET_NAME = re.compile(r"pass|secret|token|key|auth|credential|sas", re.IGNORECASE)
#: Shorter secrets are not scrubbed from free text: masking every "ab" would garble the log.
MIN_SCRUB_LENGTH = 4


def _split(url: str) -> list[str]:
    return url.split(";")  # kombu's failover separator, applied before any parsing


def _parts(url: str) -> tuple[str, str, str, str] | None:
    """(scheme, userinfo, hostport, rest) as urllib splits a netloc; None without `://`."""
    scheme, sep, after = url.partition("://")
    if not sep:
        return None
    end = min((i for i in (after.find(c) for c in "/?#") if i >= 0), default=len(after))
    # An `@` past that point means a password holding an unencoded `/`, `?` or `#` (urllib
    # and kombu would cut it there): take everything up to the last `@` as credentials.
    last_at = after.split("?", 1)[0].rfind("@")
    if last_at > end:
        end = after.find("/", last_at)
        end = len(after) if end < 0 else end
    netloc, rest = after[:end], after[end:]
    userinfo, at, hostport = netloc.rpartition("@")
    return scheme, userinfo if at else "", hostport, rest


def _odd_port(hostport: str) -> str | None:
    """What follows the host's `:` when it is not a port number: `amqp://user:pa;ss@h` split
    at kombu's `;` leaves `amqp://user:pa`, whose "port" is half a password."""
    host, sep, port = hostport.rpartition(":")
    if not sep or not port or port.isdigit() or host.endswith(":") or "]" in port:
        return None
    return port


def _mask_query(rest: str) -> str:
    path, sep, query = rest.partition("?")
    if not sep or not query:
        return rest
    if "@" in query:  # `redis://u?pa=ss@host`: a '?' in the credentials, not a query string
        return f"{path}?{MASK}"
    fragment = ""
    query, hash_, tail = query.partition("#")
    if hash_:
        fragment = "#" + tail
    pairs = parse_qsl(query, keep_blank_values=True)
    masked = [(k, MASK if SECRET_NAME.search(k) and v else v) for k, v in pairs]
    return f"{path}?{urlencode(masked, safe='*')}{fragment}"


def mask_one(url: str) -> str:
    try:
        parts = _parts(url)
        if parts is None:
            return url if "@" not in url and "?" not in url else MASK
        scheme, userinfo, hostport, rest = parts
        if ":" in userinfo:  # user:password (a lone userinfo is a user name to kombu)
            user = userinfo.partition(":")[0]
            userinfo = f"{user}:{MASK}"
        elif (port := _odd_port(hostport)) is not None:
            hostport = hostport[: -len(port)] + MASK
        auth = f"{userinfo}@" if userinfo else ""
        return f"{scheme}://{auth}{hostport}{_mask_query(rest)}"
    except Exception:  # never let showing a URL break anything
        return url.partition("://")[0] + "://" + MASK


def mask_url(url: str) -> str:
    """`url` with every credential masked; failover lists keep their `;`."""
    return ";".join(mask_one(part) for part in _split(url))


def url_secrets(url: str) -> set[str]:
    """The secret strings in a broker URL, as written and percent-decoded."""
    found: set[str] = set()
    for part in _split(url):
        parts = _parts(part)
        if parts is None:  # the tail of a password that held a `;`
            if "@" in part:
                found.add(part.rpartition("@")[0])
            continue
        _, userinfo, _, rest = parts
        if ":" in userinfo:
            found.add(userinfo.partition(":")[2])
        elif (port := _odd_port(parts[2])) is not None:
            found.add(port)
        query = rest.partition("?")[2].partition("#")[0]
        if "@" in query:  # see _mask_query: all of it up to the host may be a password
            found.add(query.rpartition("@")[0])
        for name, value in parse_qsl(query, keep_blank_values=True):
            if SECRET_NAME.search(name):
                found.add(value)
    return found | {unquote(secret) for secret in found}


def option_secrets(options: object) -> set[str]:
    """String values under secret-looking keys anywhere in transport options."""
    found: set[str] = set()

    def walk(value: object, secret: bool) -> None:
        if isinstance(value, Mapping):
            for key, inner in value.items():
                walk(inner, secret or bool(SECRET_NAME.search(str(key))))
        elif isinstance(value, (list, tuple)):
            for inner in value:
                walk(inner, secret)
        elif secret and isinstance(value, str):
            found.add(value)

    walk(options, False)
    return found


class Scrubber:
    """Replace known secret strings in text with `**`."""

    def __init__(self, secrets: Iterable[str]) -> None:
        usable = sorted({s for s in secrets if len(s) >= MIN_SCRUB_LENGTH}, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, usable))) if usable else None

    def __call__(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub(MASK, text)


class ScrubFilter(logging.Filter):
    """A logging filter that scrubs each record's final message (arguments included)."""

    def __init__(self, scrub: Scrubber) -> None:
        super().__init__()
        self._scrub = scrub

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        scrubbed = self._scrub(message)
        if scrubbed != message:
            record.msg, record.args = scrubbed, None
        if record.exc_info and not record.exc_text:  # tracebacks quote arguments too
            record.exc_text = self._scrub(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = self._scrub(record.exc_text)
        return True
