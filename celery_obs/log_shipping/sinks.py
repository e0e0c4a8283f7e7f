"""Where shipped log lines go: Logstash's `http` input (batches, acknowledged) or its `tcp`
input with the `json_lines` codec (simpler, no acknowledgement).

A sink only sends; `ShippingHandler` owns queueing, retries and the spool. `send` delivers a
batch or raises `SinkError`, and the handler keeps the lines for later.
"""

from __future__ import annotations

import base64
import http.client
import select
import socket
import ssl
import urllib.parse
from collections import deque
from typing import Protocol


class SinkError(OSError):
    """The sink did not take the batch (or part of it); it is retried from the spool.

    `remaining` is None when nothing was taken, else the lines still to send (a bulk request
    where some documents were stored and others must be retried).
    """

    def __init__(self, message: str, remaining: list[bytes] | None = None) -> None:
        super().__init__(message)
        self.remaining = remaining


def safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.password is None:
        return url
    netloc = parsed.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit(parsed._replace(netloc=f"{parsed.username}:***@{netloc}"))


#: Whole-batch answers that would be the same on every retry (a body Logstash cannot parse, a
#: record over its size limit): refused for good, so one bad batch cannot stop everything
#: behind it. A batch over the size limit (413) is split first, so that only the record too
#: large on its own is refused. Auth (401/403), a wrong path (404), timeouts and throttling
#: retry.
PERMANENT_STATUSES = frozenset({400, 413, 415, 422})


class Sink(Protocol):
    def send(self, lines: list[bytes]) -> None:
        """Deliver every line or raise SinkError. Lines the sink refuses for good (a document
        Elasticsearch cannot map) are not retried: the sink counts them in `rejected` and
        describes the latest in `last_rejection`, and the handler reports them in a record."""

    def close(self) -> None: ...


class HttpSink:
    """POST a JSON array of records to Logstash's http input (one event per element)."""

    def __init__(
        self,
        url: str,
        timeout: float = 5.0,
        username: str | None = None,
        password: str | None = None,
        api_key: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(
                f"log shipping URL must be http(s)://host[:port][/path], got {safe_url(url)!r}"
            )
        self.https = parsed.scheme == "https"
        self.host, self.port = parsed.hostname, parsed.port
        self.path = parsed.path or "/"
        self.timeout = timeout
        self.ssl_context = ssl_context
        self.headers = {"Content-Type": "application/json"}
        user = username or (urllib.parse.unquote(parsed.username) if parsed.username else None)
        secret = password or (urllib.parse.unquote(parsed.password) if parsed.password else "")
        if api_key:
            self.headers["Authorization"] = f"ApiKey {api_key}"
        elif user:
            token = base64.b64encode(f"{user}:{secret}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"
        self._connection: http.client.HTTPConnection | None = None
        self._reused = False  # the connection has carried a request before
        self.rejected = 0
        self.last_rejection = ""

    def _connect(self) -> http.client.HTTPConnection:
        if self._connection is None:
            if self.https:
                self._connection = http.client.HTTPSConnection(
                    self.host, self.port, timeout=self.timeout, context=self.ssl_context
                )
            else:
                self._connection = http.client.HTTPConnection(
                    self.host, self.port, timeout=self.timeout
                )
        return self._connection

    def send(self, lines: list[bytes]) -> None:
        """POST the batch; a batch refused as too large (413) is split in halves, down to one
        record, so that only a record too large on its own is refused."""
        chunks: deque[list[bytes]] = deque([lines])
        while chunks:
            chunk = chunks.popleft()
            try:
                response = self._post_lines(chunk)
            except SinkError as exc:
                unsent = [line for rest in (chunk, *chunks) for line in rest]
                exc.remaining = None if len(unsent) == len(lines) else unsent
                raise
            if response.status == 413 and len(chunk) > 1:
                half = len(chunk) // 2
                chunks.extendleft((chunk[half:], chunk[:half]))
                continue
            if response.status in PERMANENT_STATUSES:
                self.rejected += len(chunk)
                self.last_rejection = f"HTTP {response.status} {response.reason}"
                continue
            if not 200 <= response.status < 300:
                unsent = [line for rest in (chunk, *chunks) for line in rest]
                raise SinkError(
                    f"HTTP {response.status} {response.reason}",
                    remaining=None if len(unsent) == len(lines) else unsent,
                )

    def _post_lines(self, lines: list[bytes]) -> http.client.HTTPResponse:
        body = b"[" + b",".join(lines) + b"]"
        try:
            return self._post(body)
        except (OSError, http.client.HTTPException) as exc:
            if not self._reused or not isinstance(exc, _STALE):
                self.close()
                raise SinkError(f"{type(exc).__name__}: {exc}") from None
            # A kept-alive connection the server closed while idle: a new one, once, at once.
            self.close()
            try:
                return self._post(body)
            except (OSError, http.client.HTTPException) as again:
                self.close()
                raise SinkError(f"{type(again).__name__}: {again}") from None

    def _post(self, body: bytes) -> http.client.HTTPResponse:
        connection = self._connect()
        self._reused = getattr(connection, "sock", None) is not None
        connection.request("POST", self.path, body=body, headers=self.headers)
        response = connection.getresponse()
        response.read()
        return response

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


#: How a kept-alive connection that the server closed shows up on the next request.
_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


class TcpSink:
    """Newline-delimited JSON over TCP (or TLS) to Logstash's `tcp` input, `json_lines` codec.

    There is no acknowledgement: a batch counts as sent once the kernel took it. If Logstash
    goes away abruptly, lines still in flight (socket buffers, Logstash's own) are lost without
    an error; the HTTP sink is the one that guarantees delivery. Before each batch the sink
    checks whether the peer has closed the connection, so a Logstash restart costs at most what
    was in flight, not the next batch too.
    """

    def __init__(
        self, url: str, timeout: float = 5.0, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("tcp", "tls") or not parsed.hostname or not parsed.port:
            raise ValueError(
                "TCP log shipping URL must be tcp://host:port or tls://host:port, "
                f"got {safe_url(url)!r}"
            )
        self.host, self.port = parsed.hostname, parsed.port
        self.timeout = timeout
        self.ssl_context = ssl_context
        if parsed.scheme == "tls" and self.ssl_context is None:
            self.ssl_context = ssl.create_default_context()
        self._socket: socket.socket | None = None

    def _connect(self) -> socket.socket:
        if self._socket is not None and self._peer_closed(self._socket):
            self.close()
        if self._socket is None:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(sock, server_hostname=self.host)
            self._socket = sock
        return self._socket

    def _peer_closed(self, sock: socket.socket) -> bool:
        """Logstash never writes to us: readable means EOF or a reset. Over TLS, readable can
        also be a session ticket, which only a read tells apart (it yields no data)."""
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        if not isinstance(sock, ssl.SSLSocket):
            return True
        sock.setblocking(False)
        try:
            return sock.recv(1) == b""
        except ssl.SSLWantReadError:
            return False
        except OSError:
            return True
        finally:
            sock.settimeout(self.timeout)

    def send(self, lines: list[bytes]) -> None:
        try:
            self._connect().sendall(b"\n".join(lines) + b"\n")
        except OSError as exc:
            self.close()
            raise SinkError(f"{type(exc).__name__}: {exc}") from None

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
