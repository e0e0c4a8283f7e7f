"""What a hostile client can cost: request heads are bounded in size and count (431), in time
(slow clients are closed while others are served), and so in memory per connection."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
from test_http import BODY, connect, exchange, headers_of, running, status_of, write_tls_config

from celery_obs.exporter.http import Limits
from celery_obs.exporter.webconfig import WebConfig, load_web_config

from support import http_get, wait_for

LIMIT = Limits().max_header_bytes


def serving_config(
    scheme: str, request: pytest.FixtureRequest, tmp_path: Path
) -> tuple[WebConfig | None, ssl.SSLContext | None]:
    """(web config, client context) for plain HTTP or for TLS with the session certificate."""
    if scheme == "http":
        return None, None
    certificate = request.getfixturevalue("certificate")
    config = load_web_config(str(write_tls_config(tmp_path, certificate)))
    return config, ssl.create_default_context(cafile=str(certificate[0]))


@pytest.fixture(params=["http", "https"])
def tls(
    request: pytest.FixtureRequest, tmp_path: Path
) -> tuple[WebConfig | None, ssl.SSLContext | None]:
    return serving_config(request.param, request, tmp_path)


@pytest.mark.parametrize(
    "headers",
    [
        [("X-Big", "a" * (LIMIT + 1))],  # one huge field
        [(f"X-{i}", "a" * 1000) for i in range(LIMIT // 1000 + 1)],  # many that add up
        [(f"X-{i}", "1") for i in range(101)],  # too many fields, however small
    ],
    ids=["one-big-field", "fields-adding-up", "too-many-fields"],
)
def test_oversized_request_heads_get_431(tls, headers: list[tuple[str, str]]) -> None:
    web_config, client = tls
    head = "".join(f"{name}: {value}\r\n" for name, value in headers)
    with running(web_config=web_config) as server:
        response = exchange(server, f"GET /metrics HTTP/1.1\r\n{head}\r\n".encode(), client)
        assert status_of(response) == 431
        assert headers_of(response)["connection"] == "close"
        assert http_get(f"{server.url}/healthz", context=client)[0] == 200


@pytest.mark.parametrize(("over", "status"), [(0, 200), (1, 431)])
def test_the_limit_is_exact(over: int, status: int) -> None:
    request_line = b"GET /metrics HTTP/1.0\r\n"
    filler = LIMIT - len(request_line) - len(b"X: ") + over  # the ending CRLFs are not counted
    with running() as server:
        response = exchange(server, request_line + b"X: " + b"a" * filler + b"\r\n\r\n")
    assert status_of(response) == status


def test_an_endless_request_line_gets_414() -> None:
    with running() as server:
        response = exchange(server, b"GET /" + b"a" * (2 * LIMIT))
    assert status_of(response) == 414


def test_unfinished_big_heads_hold_at_most_the_bound_per_connection() -> None:
    # The reported attack: many connections each sending a megabyte of headers, never ending
    # them. Python's own parser keeps up to 100 lines of 64 KiB each; ours keeps the bound.
    connections = 40
    line = b"X-Fill: " + b"a" * (60 * 1024) + b"\r\n"
    payload = b"GET /metrics HTTP/1.1\r\n" + line * 17
    answers: list[bytes] = []

    def attack(server) -> None:
        try:
            with socket.create_connection(server.server_address[:2], timeout=3) as sock:
                # The server may answer and stop reading before all is sent: the point.
                with contextlib.suppress(OSError):
                    sock.sendall(payload)
                answers.append(sock.recv(100))
        except OSError as exc:
            answers.append(repr(exc).encode())

    with running() as server:
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            threads = [threading.Thread(target=attack, args=(server,)) for _ in range(connections)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            peak = tracemalloc.get_traced_memory()[1] - before
        finally:
            tracemalloc.stop()
    assert [answer[:12] for answer in answers] == [b"HTTP/1.1 431"] * connections
    # The bound, a read chunk and the answer per connection; not the 1 MiB each client sent.
    print(f"peak {peak / connections:.0f} bytes per connection")
    assert peak < connections * 2 * LIMIT, f"{peak / connections:.0f} bytes per connection"


def _slow_client(server, context, mode: str, outcome: dict[str, object]) -> None:
    """Connect, then send nothing, or a request head (or a TLS handshake) a byte at a time,
    until cut off."""
    started = time.monotonic()
    received = b""
    try:
        raw = mode == "trickled-handshake"
        with connect(server, None if raw else context, timeout=30) as sock:
            if mode != "silent":
                sock.sendall(b"\x16\x03\x01\x02\x00" if raw else b"GET /metrics HTTP/1.1\r\n")
                sock.settimeout(0.2)
                while True:
                    sock.sendall(b"X")
                    try:
                        received = sock.recv(4096)
                        break  # an answer, or the end of the connection
                    except TimeoutError:
                        continue
            else:
                received = sock.recv(4096)
    except OSError as exc:  # a reset, or a TLS handshake cut short
        received = repr(exc).encode()
    outcome["elapsed"] = time.monotonic() - started
    outcome["received"] = received


@pytest.mark.parametrize(
    ("scheme", "mode"),
    [
        ("http", "silent"),
        ("http", "trickled-head"),
        ("https", "silent"),
        ("https", "trickled-head"),
        ("https", "trickled-handshake"),
    ],
)
def test_a_slow_client_is_closed_at_the_header_timeout_while_others_are_served(
    request: pytest.FixtureRequest, tmp_path: Path, scheme: str, mode: str
) -> None:
    web_config, client = serving_config(scheme, request, tmp_path)
    timeout = 1.5
    outcome: dict[str, object] = {}
    with running(web_config=web_config, limits=Limits(header_timeout=timeout)) as server:
        slow = threading.Thread(target=_slow_client, args=(server, client, mode, outcome))
        slow.start()
        wait_for(lambda: server.active_connections == 1, 10, "the slow client connected")
        assert http_get(f"{server.url}/metrics", context=client) == (200, BODY.decode())
        slow.join(10 * timeout)
    assert not slow.is_alive(), "the slow client was never cut off"
    assert timeout * 0.9 <= outcome["elapsed"] < 10 * timeout
    if mode == "trickled-head":  # it had started a request: it is told why it ends
        assert bytes(outcome["received"]).startswith(b"HTTP/1.1 408")  # type: ignore[arg-type]
