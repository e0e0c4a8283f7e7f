"""Serve `/metrics` and `/healthz` over HTTP or HTTPS with optional bcrypt basic auth, to many
scrapers at once and to hostile clients at a bounded cost (docs/http-security.md).

- At most `Limits.max_connections` connections are served at once, a thread each (the TLS
  handshake happens there, never in the accept loop); more wait in a deep listen backlog.
- A request head (and, first, the TLS handshake) must arrive within `header_timeout` and fit in
  `max_header_bytes` / `max_headers` (else 408 / 431): a connection holds at most that much.
- Concurrent scrapes share one rendering of /metrics (`SingleFlight`) and its gzip.
- Basic auth costs the same for unknown users as for wrong passwords (`BasicAuth`).
- The web config (TLS, users, headers) is re-read when its files change (`WebConfigWatcher`).

A plain-HTTP request to the HTTPS port gets a 400 saying so, as Go's servers answer.
"""

from __future__ import annotations

import functools
import logging
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from urllib.parse import urlsplit

from .httpauth import BasicAuth
from .httpwire import (
    HEAD_END,
    OPENMETRICS,
    PROTOBUF,
    TEXT,
    HttpError,
    Request,
    linger,
    negotiate,
    parse_head,
    remaining,
    send_all,
    wants_gzip,
)
from .singleflight import Rendered, SingleFlight
from .webconfig import WebConfig, WebConfigWatcher

log = logging.getLogger(__name__)

HealthCheck = Callable[[], tuple[bool, str]]
#: Produces the /metrics body and its content type in a format `negotiate` names (text,
#: openmetrics or protobuf).
Render = Callable[[str], tuple[bytes, str]]

_TEXT = "text/plain; charset=utf-8"
_PLAIN_HTTP_TO_HTTPS = (
    b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Connection: close\r\n\r\nClient sent an HTTP request to an HTTPS server.\n"
)
_TLS_HANDSHAKE_RECORD = 0x16
_POLL = 0.5  # how often the accept loop, while every slot is taken, looks at the stop flag
_READ_CHUNK = 16 * 1024
_COALESCE = 64 * 1024  # a body this small goes out in one write with its head
_IDLE_CHECK = 1.0  # how often an idle kept-alive connection looks whether the server is full

LANDING_PAGE = """<html><head><title>Celery exporter</title></head><body>
<h1>Celery exporter (celery-observability)</h1>
<p><a href="/metrics">Metrics</a> &middot; <a href="/readyz">Ready</a> &middot;
<a href="/livez">Alive</a></p>
</body></html>
"""


@dataclass(frozen=True)
class Limits:
    """What the endpoint spends on clients. The defaults suit scrapers and resist abuse."""

    #: Connections served at once (a thread each); more wait in the listen backlog.
    max_connections: int = 128
    #: Listen backlog (the kernel caps it at net.core.somaxconn).
    backlog: int = 4096
    #: From accept (TLS handshake included), or from a keep-alive request's first byte, to the
    #: end of the request head.
    header_timeout: float = 5.0
    #: How long a kept-alive connection may wait for its next request.
    idle_timeout: float = 30.0
    #: How long a client may take to receive one response.
    write_timeout: float = 30.0
    #: Request line plus headers, in bytes; and how many header lines.
    max_header_bytes: int = 32 * 1024
    max_headers: int = 100


#: Health probes: answered to requests without credentials too (see `_Connection._answer`).
PROBES = frozenset({"/readyz", "/healthz", "/livez"})


def _path_of(target: str) -> str:
    if not target.startswith("/"):  # absolute form (RFC 9112 3.2.2): the path is what counts
        target = urlsplit(target).path or "/"
    return target.split("?", 1)[0]


class _Connection:
    """One client connection: reads bounded request heads and answers them, kept alive if asked."""

    def __init__(self, server: MetricsServer, sock: socket.socket, peer: object) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.limits = server.limits
        self.clock = server.clock
        self.buffer = bytearray()

    def serve(self, deadline: float) -> None:
        while True:
            try:
                head = self._read_head(deadline)
                if head is None:
                    return
                request = parse_head(head, self.limits.max_headers)
            except HttpError as error:
                self._fail(error)
                return
            except TimeoutError:
                if self.buffer:  # a request had started: say why it ends
                    self._fail(HttpError(408, "request head not received in time"))
                return
            if not self._answer(request):
                if request.has_body:  # unread: closing now could reset the answer away
                    linger(self.sock, self.clock)
                return
            if not self.buffer and not self._wait_for_next_request():
                return
            deadline = self.clock() + self.limits.header_timeout

    def _read_head(self, deadline: float) -> bytes | None:
        limit = self.limits.max_header_bytes
        searched = 0
        while True:
            if self.buffer[:1] in (b"\r", b"\n"):  # empty lines before a request are ignored
                self.buffer = bytearray(self.buffer.lstrip(b"\r\n"))
                searched = 0
            end = HEAD_END.search(self.buffer, max(0, searched - 3))
            if end is not None:
                if end.start() > limit:
                    raise HttpError(431, f"request head larger than {limit} bytes")
                head = bytes(self.buffer[: end.start()])
                del self.buffer[: end.end()]
                return head
            if len(self.buffer) > limit + 3:
                if b"\n" not in self.buffer:
                    raise HttpError(414, f"request line longer than {limit} bytes")
                raise HttpError(431, f"request head larger than {limit} bytes")
            searched = len(self.buffer)
            self.sock.settimeout(remaining(deadline, self.clock))
            chunk = self.sock.recv(min(_READ_CHUNK, limit + 4 - len(self.buffer)))
            if not chunk:
                return None
            self.buffer += chunk

    def _wait_for_next_request(self) -> bool:
        # An idle kept-alive connection gives its slot up as soon as every slot is taken:
        # its client just reconnects, while a new one would otherwise wait in the backlog.
        deadline = self.clock() + self.limits.idle_timeout
        while (left := deadline - self.clock()) > 0:
            self.sock.settimeout(min(_IDLE_CHECK, left))
            try:
                chunk = self.sock.recv(min(_READ_CHUNK, self.limits.max_header_bytes))
            except TimeoutError:
                if self.server.full:
                    return False
                continue
            self.buffer += chunk
            return bool(chunk)
        return False

    def _answer(self, request: Request) -> bool:
        config, auth = self.server.security()
        path = _path_of(request.target)
        credentials = request.headers.get("authorization")
        reading = request.method in ("GET", "HEAD")
        if reading and path in PROBES and auth is not None and credentials is None:
            # A kubelet or Docker probe carries no credentials, and putting them in a manifest
            # would spread the password. It gets the probe's answer, up or down, without the
            # reason (which names the broker); sent credentials are checked as anywhere else.
            status, body, content_type, extra = self._probe(path, detailed=False)
        elif auth is not None and not auth.allows(credentials):
            status, body, content_type = 401, b"Unauthorized\n", _TEXT
            extra = {"WWW-Authenticate": 'Basic realm="celery-obs"'}
        elif not reading:
            status, body, content_type = 405, b"Method not allowed: use GET or HEAD\n", _TEXT
            extra = {"Allow": "GET, HEAD"}
        else:
            status, body, content_type, extra = self._route(path, request)
        keep_alive = request.keep_alive
        self._send(
            status,
            body,
            content_type,
            {**config.headers, **extra},
            head_only=request.method == "HEAD",
            keep_alive=keep_alive,
            version=request.version,
        )
        log.debug("%s %s %s -> %d", self.peer, request.method, request.target, status)
        return keep_alive

    def _route(self, path: str, request: Request) -> tuple[int, bytes, str, dict[str, str]]:
        server = self.server
        if path == "/metrics":
            try:
                rendered = server.renderings[negotiate(request.headers.get("accept"))]()
            except Exception:
                log.exception("rendering /metrics failed")
                return 500, b"Rendering the metrics failed; see the exporter's log\n", _TEXT, {}
            extra = {"Vary": "Accept, Accept-Encoding"}
            if wants_gzip(request.headers.get("accept-encoding")):
                extra["Content-Encoding"] = "gzip"
                return 200, rendered.gzipped(), rendered.content_type, extra
            return 200, rendered.body, rendered.content_type, extra
        if path in PROBES:
            return self._probe(path, detailed=True)
        if path == "/":
            return 200, LANDING_PAGE.encode(), "text/html; charset=utf-8", {}
        return 404, b"Not found: try /metrics, /readyz or /livez\n", _TEXT, {}

    def _probe(self, path: str, *, detailed: bool) -> tuple[int, bytes, str, dict[str, str]]:
        # /readyz: connected and consuming (fresh metrics); /healthz is its old name.
        # /livez: the process works, even while the broker is away.
        check = self.server.liveness if path == "/livez" else self.server.health
        healthy, reason = check()
        if not detailed:
            reason = "ok" if healthy else "not ok: send credentials for the reason"
        return (200 if healthy else 503), f"{reason}\n".encode(), _TEXT, {}

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str,
        headers: dict[str, str],
        *,
        head_only: bool = False,
        keep_alive: bool = False,
        version: str = "HTTP/1.1",
    ) -> None:
        lines = [
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
            f"Date: {formatdate(usegmt=True)}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
            *(f"{name}: {value}" for name, value in headers.items()),
        ]
        if not keep_alive:
            lines.append("Connection: close")
        elif version == "HTTP/1.0":
            lines.append("Connection: keep-alive")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        deadline = self.clock() + self.limits.write_timeout
        if head_only or not body:
            send_all(self.sock, head, deadline, self.clock)
        elif len(body) <= _COALESCE:
            send_all(self.sock, head + body, deadline, self.clock)
        else:
            send_all(self.sock, head, deadline, self.clock)
            send_all(self.sock, body, deadline, self.clock)

    def _fail(self, error: HttpError) -> None:
        log.debug("%s: %d %s", self.peer, error.status, error)
        try:
            self._send(
                error.status,
                f"{error}\n".encode(),
                _TEXT,
                dict(self.server.web_config.headers),
            )
        except OSError:
            return
        linger(self.sock, self.clock)


def _rendered(render: Render, kind: str) -> Rendered:
    return Rendered(*render(kind))


class MetricsServer:
    """The HTTP(S) endpoint. `render` makes the /metrics body; `health` answers /readyz (and
    its old name /healthz), `liveness` /livez (by default: the server answers, so alive)."""

    def __init__(
        self,
        address: tuple[str, int],
        render: Render,
        health: HealthCheck,
        web_config: WebConfig | None = None,
        limits: Limits | None = None,
        *,
        liveness: HealthCheck = lambda: (True, "ok: alive"),
        reload_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.limits = limits or Limits()
        self.socket = socket.socket(self.address_family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind(address)
            self.socket.listen(self.limits.backlog)
        except OSError:
            self.socket.close()
            raise
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()
        # The accept loop sleeps in select() on the listener and on this pair, which shutdown()
        # writes to: it wakes at once, and never spins while idle.
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.socket, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self.render = render
        self.health = health
        self.liveness = liveness
        self.clock = clock
        #: One shared rendering per format in flight.
        self.renderings: dict[str, SingleFlight[Rendered]] = {
            kind: SingleFlight(functools.partial(_rendered, render, kind))
            for kind in (TEXT, OPENMETRICS, PROTOBUF)
        }
        self.watcher = WebConfigWatcher(
            web_config or WebConfig(), interval=reload_interval, clock=clock
        )
        self._auth: tuple[WebConfig, BasicAuth | None] | None = None
        self._slots = threading.BoundedSemaphore(self.limits.max_connections)
        self._active = 0
        self._active_lock = threading.Lock()
        self._stop = threading.Event()
        self._serving = threading.Event()
        self._stopped = threading.Event()

    @property
    def web_config(self) -> WebConfig:
        """The web config in force now (re-read first if its files changed)."""
        return self.watcher.current()

    def security(self) -> tuple[WebConfig, BasicAuth | None]:
        config = self.watcher.current()
        current = self._auth
        if current is None or current[0] is not config:
            users = config.basic_auth_users
            current = self._auth = (config, BasicAuth(users) if users else None)
        return current

    def reload_web_config(self) -> bool:
        """Re-read the web config now (on SIGHUP); the old one stays if the new one is bad."""
        return self.watcher.reload()

    @property
    def active_connections(self) -> int:
        return self._active

    @property
    def full(self) -> bool:
        """Every connection slot is taken: new connections wait in the backlog."""
        return self._active >= self.limits.max_connections

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        scheme = "https" if self.watcher.current().ssl_context else "http"
        # Only the URL shown for the address listened on: all interfaces -> a local one.
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host  # noqa: S104
        shown = f"[{shown}]" if ":" in str(shown) else shown
        return f"{scheme}://{shown}:{port}"

    def serve_forever(self) -> None:
        self._serving.set()
        try:
            while not self._stop.is_set():
                # No free slot: leave the next connection in the kernel's backlog.
                if not self._slots.acquire(timeout=_POLL):
                    continue
                self._selector.select()
                try:
                    if self._stop.is_set():
                        raise InterruptedError("shutting down")
                    sock, peer = self.socket.accept()
                except (BlockingIOError, InterruptedError):
                    self._slots.release()
                    continue
                except OSError as exc:  # out of file descriptors, or closed by server_close
                    self._slots.release()
                    if not self._stop.is_set() and self.socket.fileno() != -1:
                        log.warning("accepting a connection failed: %s", exc)
                        self._stop.wait(_POLL)  # not a busy loop while descriptors run out
                    continue
                self._start(sock, peer)
        finally:
            self._stopped.set()

    def _start(self, sock: socket.socket, peer: object) -> None:
        with self._active_lock:
            self._active += 1
        try:
            threading.Thread(
                target=self._serve, args=(sock, peer), name="http-connection", daemon=True
            ).start()
        except RuntimeError:  # can't start new thread: this connection is refused
            sock.close()
            self._release()

    def _release(self) -> None:
        with self._active_lock:
            self._active -= 1
        self._slots.release()

    def _serve(self, sock: socket.socket, peer: object) -> None:
        conn = sock
        try:
            deadline = self.clock() + self.limits.header_timeout
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            context = self.watcher.current().ssl_context
            if context is not None:
                secured = self._handshake(sock, context, deadline)
                if secured is None:
                    return
                conn = secured
            _Connection(self, conn, peer).serve(deadline)
        except OSError as exc:  # timeouts, resets, failed TLS handshakes: this connection ends
            log.debug("connection from %s ended: %s", peer, exc)
        except Exception:
            log.exception("serving %s failed", peer)
        finally:
            conn.close()
            sock.close()
            self._release()

    def _handshake(
        self, sock: socket.socket, context: ssl.SSLContext, deadline: float
    ) -> ssl.SSLSocket | None:
        sock.settimeout(remaining(deadline, self.clock))
        first = sock.recv(1, socket.MSG_PEEK)
        if not first:
            return None
        if first[0] != _TLS_HANDSHAKE_RECORD:
            send_all(sock, _PLAIN_HTTP_TO_HTTPS, deadline, self.clock)
            linger(sock, self.clock)
            return None
        tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        try:
            # One deadline for the whole handshake: the ssl module spreads its timeout over it.
            tls.settimeout(remaining(deadline, self.clock))
            tls.do_handshake()
        except BaseException:
            tls.close()
            raise
        return tls

    def shutdown(self) -> None:
        """Stop accepting; returns once the accept loop has ended (connections finish alone)."""
        self._stop.set()
        if self._serving.is_set():
            self._wake_w.send(b"\0")
            self._stopped.wait()

    def server_close(self) -> None:
        self._selector.close()
        self.socket.close()
        self._wake_r.close()
        self._wake_w.close()

    def serve_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="http", daemon=True)
        thread.start()
        return thread
