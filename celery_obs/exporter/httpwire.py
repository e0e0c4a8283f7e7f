"""HTTP/1.x on a socket, with every cost bounded: request heads parsed strictly, writes and
lingering closes under deadlines, Accept and Accept-Encoding negotiated by q-values (RFC 9110,
9112)."""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from dataclasses import dataclass

_SEND_CHUNK = 256 * 1024
# After an error the client may still be sending; reading (and dropping) a little before closing
# lets it see the answer instead of a connection reset.
_LINGER_SECONDS, _LINGER_BYTES = 1.0, 1 << 20
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_Q_VALUE = re.compile(r"0(\.\d{0,3})?|1(\.0{0,3})?")
HEAD_END = re.compile(rb"\r?\n\r?\n")


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    version: str
    headers: dict[str, str]  # lower-case names; repeated fields joined by ", "

    @property
    def has_body(self) -> bool:
        length = self.headers.get("content-length", "0").strip()
        return length not in ("", "0") or "transfer-encoding" in self.headers

    @property
    def keep_alive(self) -> bool:
        # A body is never read here, so its connection cannot carry another request.
        if self.has_body:
            return False
        connection = {
            token.strip().lower() for token in self.headers.get("connection", "").split(",")
        }
        if self.version == "HTTP/1.1":
            return "close" not in connection
        return "keep-alive" in connection


def parse_head(head: bytes, max_headers: int) -> Request:
    lines = [line[:-1] if line.endswith(b"\r") else line for line in head.split(b"\n")]
    if len(lines) - 1 > max_headers:
        raise HttpError(431, f"more than {max_headers} header fields")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1]:
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if any(byte <= 0x20 or byte == 0x7F for byte in target):
        raise HttpError(400, "malformed request target")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        status = 505 if version.startswith(b"HTTP/") else 400
        raise HttpError(status, "only HTTP/1.0 and HTTP/1.1 are served")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        # Also refuses obsolete line folding and whitespace before the colon (RFC 9112 5).
        if not colon or not _TOKEN.fullmatch(name):
            raise HttpError(400, "malformed header field")
        value = value.strip(b" \t")
        if b"\r" in value or b"\0" in value:
            raise HttpError(400, "malformed header field")
        key, text = name.decode("ascii").lower(), value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return Request(method.decode("ascii"), target.decode("latin-1"), version.decode(), headers)


def remaining(deadline: float, clock: Callable[[], float]) -> float:
    left = deadline - clock()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


def send_all(sock: socket.socket, data: bytes, deadline: float, clock: Callable[[], float]) -> None:
    # socket.sendall's timeout is per send on TLS sockets: a slow reader could stretch it.
    view = memoryview(data)
    while view:
        sock.settimeout(remaining(deadline, clock))
        view = view[sock.send(view[:_SEND_CHUNK]) :]


def linger(sock: socket.socket, clock: Callable[[], float]) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline, scratch, dropped = clock() + _LINGER_SECONDS, bytearray(8192), 0
        while dropped < _LINGER_BYTES:
            sock.settimeout(remaining(deadline, clock))
            read = sock.recv_into(scratch)
            if not read:
                return
            dropped += read
    except OSError:
        pass


def _entries(header: str | None) -> list[tuple[str, float, dict[str, str]]]:
    """An Accept-style header as (item, q, other parameters) per listing (RFC 9110 12.4.2: an
    unparsable q-value counts as 0)."""
    entries = []
    for entry in (header or "").split(","):
        item, *params = entry.split(";")
        item = item.strip().lower()
        if not item:
            continue
        weight, other = 1.0, {}
        for param in params:
            name, _, value = param.partition("=")
            name, value = name.strip().lower(), value.strip().strip('"')
            if name == "q":
                weight = float(value) if _Q_VALUE.fullmatch(value) else 0.0
            else:
                other[name] = value
        entries.append((item, weight, other))
    return entries


def wants_gzip(accept_encoding: str | None) -> bool:
    """Whether this Accept-Encoding prefers gzip to identity (RFC 9110 12.5.3: q-values, `*`,
    `identity`; an unparsable q-value counts as 0, ties go to gzip)."""
    weights: dict[str, float] = {}
    for coding, q, _ in _entries(accept_encoding):
        weights.setdefault(coding, q)  # the first listing of a coding counts
    star = weights.get("*")
    gzip_q = weights.get("gzip", weights.get("x-gzip", star or 0.0))
    # Unlisted, identity stays acceptable but comes after any coding the client did list.
    identity_q = weights.get("identity", 0.001 if star is None else star)
    return gzip_q > 0 and gzip_q >= identity_q


#: The versions of each format our exposition satisfies ("" = the client did not say).
_OPENMETRICS_VERSIONS = frozenset({"", "1.0.0", "0.0.1"})
_TEXT_VERSIONS = frozenset({"", "0.0.4"})


#: The formats /metrics is written in, as `negotiate` names them.
TEXT, OPENMETRICS, PROTOBUF = "text", "openmetrics", "protobuf"
_PROTOBUF_TYPE = "application/vnd.google.protobuf"
_PROTOBUF_PROTO = "io.prometheus.client.metricfamily"


def negotiate(accept: str | None) -> str:
    """The format this Accept prefers among those we write: the Prometheus protobuf exposition
    (what Prometheus asks for first with native histograms enabled), OpenMetrics text, or the
    Prometheus text format 0.0.4, the default: no Accept, `*/*`, ties, or nothing we write asked
    for. Ties go to text, then OpenMetrics."""
    weights = {TEXT: 0.0, OPENMETRICS: 0.0, PROTOBUF: 0.0}
    fallback = 0.0
    for item, q, params in _entries(accept):
        version = params.get("version", "")
        if item == "application/openmetrics-text" and version in _OPENMETRICS_VERSIONS:
            weights[OPENMETRICS] = max(weights[OPENMETRICS], q)
        elif item == "text/plain" and version in _TEXT_VERSIONS:
            weights[TEXT] = max(weights[TEXT], q)
        elif (
            item == _PROTOBUF_TYPE
            and params.get("proto", "").lower() == _PROTOBUF_PROTO
            and params.get("encoding", "").lower() == "delimited"
        ):
            weights[PROTOBUF] = max(weights[PROTOBUF], q)
        elif item in ("text/*", "*/*"):
            fallback = max(fallback, q)
    # `*/*` or `text/*` accepts the text format at that weight too.
    weights[TEXT] = max(weights[TEXT], fallback)
    best = max(weights.values())
    if best <= 0:
        return TEXT
    return next(kind for kind in (TEXT, OPENMETRICS, PROTOBUF) if weights[kind] == best)
