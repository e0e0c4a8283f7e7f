"""Many scrapers at once: every one answered, /metrics rendered once for all who arrive together,
and no more connections served at once than the bound (the rest wait in the listen backlog).

Run as a script to measure: `python3 tests/test_http_load.py HOST PORT [N]` scrapes a running
exporter N times at once (default 1,000) and prints latency percentiles and errors.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import sys
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from test_http import BODY, connect, read_all, running, write_tls_config

from celery_obs.exporter.http import Limits
from celery_obs.exporter.webconfig import load_web_config

from support import http_get, wait_for


def scrape_all_at_once(
    host: str, port: int, count: int, context: ssl.SSLContext | None = None, timeout: float = 30
) -> tuple[list[int], list[str], list[float]]:
    """`count` threads connect and GET /metrics together; statuses, errors and latencies."""
    barrier = threading.Barrier(count)
    statuses: list[int] = []
    errors: list[str] = []
    latencies: list[float] = []
    lock = threading.Lock()

    def scrape() -> None:
        barrier.wait()
        started = time.perf_counter()
        try:
            if context is None:
                connection = http.client.HTTPConnection(host, port, timeout=timeout)
            else:
                connection = http.client.HTTPSConnection(
                    host, port, timeout=timeout, context=context
                )
            connection.request("GET", "/metrics", headers={"Accept-Encoding": "gzip"})
            response = connection.getresponse()
            response.read()
            connection.close()
            with lock:
                statuses.append(response.status)
                latencies.append(time.perf_counter() - started)
        except Exception as exc:
            with lock:
                errors.append(type(exc).__name__)

    threads = [threading.Thread(target=scrape) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses, errors, sorted(latencies)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_500_concurrent_scrapes_are_all_answered(tmp_path: Path, certificate, scheme: str) -> None:
    web_config, client = None, None
    if scheme == "https":
        web_config = load_web_config(str(write_tls_config(tmp_path, certificate)))
        client = ssl.create_default_context(cafile=str(certificate[0]))
    with running(web_config=web_config) as server:
        statuses, errors, _ = scrape_all_at_once("127.0.0.1", server.server_address[1], 500, client)
    assert errors == []
    assert statuses == [200] * 500


def test_scrapes_arriving_during_a_render_share_it() -> None:
    renders = []
    release = threading.Event()

    def render(kind: str) -> tuple[bytes, str]:
        renders.append(1)
        release.wait(30)
        return BODY + f"# render {len(renders)}\n".encode(), CONTENT_TYPE_LATEST

    with running(render) as server:
        results: list[tuple[int, str]] = []
        threads = [
            threading.Thread(
                target=lambda: results.append(http_get(f"{server.url}/metrics", timeout=30))
            )
            for _ in range(20)
        ]
        for thread in threads:
            thread.start()
        rendering = server.renderings["text"]
        wait_for(lambda: rendering.waiting == 19, 20, "19 scrapes waiting on one render")
        release.set()
        for thread in threads:
            thread.join(30)
    assert renders == [1]
    assert results == [(200, BODY.decode() + "# render 1\n")] * 20


def test_connections_beyond_the_bound_wait_in_the_backlog_and_are_served_later() -> None:
    limits = Limits(max_connections=4, header_timeout=1.0)
    most = 0
    done = threading.Event()

    def watch(server) -> None:
        nonlocal most
        while not done.is_set():
            most = max(most, server.active_connections)
            time.sleep(0.005)

    with running(limits=limits) as server:
        watcher = threading.Thread(target=watch, args=(server,))
        watcher.start()
        silent = [socket.create_connection(server.server_address[:2]) for _ in range(12)]
        try:
            wait_for(lambda: server.active_connections == 4, 10, "4 connections served")
            # Queued behind 12 silent clients, each dropped after the header timeout.
            assert http_get(f"{server.url}/metrics", timeout=30) == (200, BODY.decode())
        finally:
            done.set()
            watcher.join()
            for sock in silent:
                sock.close()
    assert most == 4


def test_idle_kept_alive_connections_give_way_when_every_slot_is_taken() -> None:
    limits = Limits(max_connections=2, idle_timeout=120)
    with running(limits=limits) as server:
        idle = [http.client.HTTPConnection("127.0.0.1", server.server_address[1]) for _ in range(2)]
        for connection in idle:
            connection.request("GET", "/healthz")  # HTTP/1.1: kept alive afterwards
            assert connection.getresponse().read() == b"ok: fine\n"
        assert server.full
        # Served long before the idle timeout: a kept-alive connection closes for it.
        assert http_get(f"{server.url}/metrics", timeout=30) == (200, BODY.decode())
        for connection in idle:
            connection.close()


def test_an_idle_kept_alive_connection_is_closed_at_the_idle_timeout() -> None:
    with running(limits=Limits(idle_timeout=1.0)) as server, connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
        started = time.monotonic()
        answer = read_all(sock)  # until the server closes
        elapsed = time.monotonic() - started
    assert answer.endswith(b"\r\n\r\nok: fine\n")
    assert 0.9 <= elapsed < 10


def main(argv: list[str]) -> int:
    host, port = argv[0], int(argv[1])
    count = int(argv[2]) if len(argv) > 2 else 1000
    statuses, errors, latencies = scrape_all_at_once(host, port, count)

    def quantile(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else 0.0

    kinds = {kind: errors.count(kind) for kind in sorted(set(errors))}
    print(
        f"{count} concurrent scrapes: {statuses.count(200)} x 200, {len(errors)} errors {kinds}; "
        f"p50 {quantile(0.5):.3f}s p99 {quantile(0.99):.3f}s max {quantile(1.0):.3f}s"
    )
    return 0 if statuses.count(200) == count else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
