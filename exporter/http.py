"""Serve `/metrics` and `/healthz` over HTTP or HTTPS, with optional bcrypt basic auth.

A thread per connection (scrapes are few); the TLS handshake happens in that thread, so a slow or
hostile client never blocks the accept loop. A plain-HTTP request to the HTTPS port gets a 400
saying so, as Go's servers answer, instead of a bare reset.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import bcrypt

from .webconfig import WebConfig

log = logging.getLogger(__name__)

HealthCheck = Callable[[], tuple[bool, str]]
#: Produces the /metrics body and its content type.
Render = Callable[[], tuple[bytes, str]]

_PLAIN_HTTP_TO_HTTPS = (
    b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Connection: close\r\n\r\nClient sent an HTTP request to an HTTPS server.\n"
)
_TLS_HANDSHAKE_RECORD = 0x16

LANDING_PAGE = """<html><head><title>Celery exporter</title></head><body>
<h1>Celery exporter (celery-observability)</h1>
<p><a href="/metrics">Metrics</a> &middot; <a href="/healthz">Health</a></p>
</body></html>
"""


class BasicAuth:
    """Check `Authorization: Basic` against bcrypt hashes, caching successes (bcrypt is slow)."""

    def __init__(self, users: dict[str, bytes]) -> None:
        self._users = users
        self._verified: set[bytes] = set()
        self._lock = threading.Lock()

    def allows(self, header: str | None) -> bool:
        if not header or not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        hashed = self._users.get(user)
        if hashed is None:
            return False
        # Cache key binds user, hash and password; only its digest is kept in memory.
        key = hashlib.sha256(b"\0".join((user.encode(), hashed, password.encode()))).digest()
        with self._lock:
            if key in self._verified:
                return True
        try:
            if not bcrypt.checkpw(password.encode(), hashed):
                return False
        except ValueError:  # bcrypt refuses passwords over 72 bytes: a failed login, not a crash
            return False
        with self._lock:
            if len(self._verified) > 1024:
                self._verified.clear()
            self._verified.add(key)
        return True


class MetricsServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        render: Render,
        health: HealthCheck,
        web_config: WebConfig | None = None,
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.render = render
        self.health = health
        self.web_config = web_config or WebConfig()
        self.auth = (
            BasicAuth(self.web_config.basic_auth_users)
            if self.web_config.basic_auth_users
            else None
        )
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else host
        scheme = "https" if self.web_config.ssl_context else "http"
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        shown = f"[{shown}]" if ":" in str(shown) else shown
        return f"{scheme}://{shown}:{port}"

    def finish_request(self, request: Any, client_address: Any) -> None:
        context = self.web_config.ssl_context
        if context is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(10)
        try:
            first = request.recv(1, socket.MSG_PEEK)
            if first and first[0] != _TLS_HANDSHAKE_RECORD:
                request.sendall(_PLAIN_HTTP_TO_HTTPS)
                return
            tls = context.wrap_socket(request, server_side=True)
        except OSError as exc:  # includes ssl.SSLError: a failed handshake ends this connection
            log.debug("TLS handshake with %s failed: %s", client_address, exc)
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            tls.close()

    def serve_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="http", daemon=True)
        thread.start()
        return thread


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer
    protocol_version = "HTTP/1.1"
    timeout = 30

    def do_GET(self) -> None:
        server = self.server
        if server.auth is not None and not server.auth.allows(self.headers.get("Authorization")):
            self._send(
                401,
                b"Unauthorized\n",
                "text/plain; charset=utf-8",
                {"WWW-Authenticate": 'Basic realm="celery-obs"'},
            )
            return
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body, content_type = server.render()
            extra = {}
            if "gzip" in (self.headers.get("Accept-Encoding") or ""):
                body = gzip.compress(body, compresslevel=1)
                extra["Content-Encoding"] = "gzip"
            self._send(200, body, content_type, extra)
        elif path == "/healthz":
            healthy, reason = server.health()
            self._send(200 if healthy else 503, f"{reason}\n".encode(), "text/plain; charset=utf-8")
        elif path == "/":
            self._send(200, LANDING_PAGE.encode(), "text/html; charset=utf-8")
        else:
            self._send(404, b"Not found: try /metrics or /healthz\n", "text/plain; charset=utf-8")

    def _send(
        self, code: int, body: bytes, content_type: str, extra: dict[str, str] | None = None
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in {**self.server.web_config.headers, **(extra or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)
