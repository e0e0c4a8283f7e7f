"""Local stand-ins for Logstash's inputs, for the log shipping tests: each can be stopped and
restarted on the same port, and keeps every record it was given, in arrival order. Plus the
one way the tests put a handler under test on a logger of its own."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import socketserver
import ssl
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HttpReceiver:
    """Logstash's http input in miniature: JSON arrays in, 200 out; can be stopped and restarted.
    With `tls` (a server context) it speaks HTTPS. It misbehaves on demand: slow (`delay`),
    refusing (`status`), or refusing bodies over `max_body` bytes with 413."""

    def __init__(
        self, port: int, tls: ssl.SSLContext | None = None, keep_alive: bool = False
    ) -> None:
        self.port = port
        self.tls = tls
        self.keep_alive = keep_alive  # HTTP/1.1 connections kept open, as Logstash does
        self.connections: list[socket.socket] = []
        self.status = 200  # what every POST gets; records are kept only on 200
        self.delay = 0.0  # seconds each POST takes to answer: a slow Logstash
        self.max_body: int | None = None  # larger bodies get 413, as a proxy's limit does
        self.requests = 0
        self.records: list[dict] = []
        self.auth: list[str | None] = []
        self.lock = threading.Lock()  # requests are handled on threads of their own
        self.server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if receiver.keep_alive else "HTTP/1.0"

            def setup(self) -> None:
                super().setup()
                receiver.connections.append(self.connection)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests += 1
                if receiver.delay:
                    time.sleep(receiver.delay)  # the receiver's own latency, not a test wait
                status = receiver.status
                if receiver.max_body is not None and len(body) > receiver.max_body:
                    status = 413
                if status == 200:
                    with receiver.lock:
                        receiver.records.extend(json.loads(body))
                receiver.auth.append(self.headers.get("Authorization"))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        if self.tls is not None:
            self.server.socket = self.tls.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def drop_idle_connections(self) -> None:
        """Close kept-alive connections, as a server does after its idle timeout."""
        for connection in self.connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        self.connections.clear()

    def stop(self) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()


class TcpReceiver:
    """Logstash's tcp input with the json_lines codec: one JSON record per line (TLS with
    `tls`, a server context)."""

    def __init__(self, port: int, tls: ssl.SSLContext | None = None) -> None:
        self.port = port
        self.tls = tls
        self.records: list[dict] = []
        self.server: socketserver.ThreadingTCPServer | None = None
        self.connections: list[socket.socket] = []

    def start(self) -> None:
        receiver = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                receiver.connections.append(self.connection)
                for line in self.rfile:
                    if line.strip():
                        receiver.records.append(json.loads(line))

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        socketserver.ThreadingTCPServer.daemon_threads = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Handler)
        if self.tls is not None:
            self.server.socket = self.tls.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """Stop listening and drop every connection, as a Logstash restart does."""
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()
        for connection in self.connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()
        self.connections.clear()


def logger_with(handler: logging.Handler) -> logging.Logger:
    """A fresh INFO logger whose only handler is `handler`, formatting ECS JSON."""
    from celery_obs.log_shipping.formatter import EcsJsonFormatter

    if handler.formatter is None:
        handler.setFormatter(EcsJsonFormatter(service_name="ship-test"))
    logger = logging.getLogger(f"ship.{uuid.uuid4().hex}")
    logger.handlers = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger
