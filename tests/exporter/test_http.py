"""`/metrics` and `/healthz` over real sockets: HTTPS with basic auth from a web-config file,
and the HTTP protocol as the endpoint speaks it (HEAD, content coding, keep-alive, errors).

The helpers here (`running`, `exchange`, `basic`, ...) serve the other tests/test_http_*.py too.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import http.client
import re
import shutil
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import bcrypt
import pytest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from celery_obs.exporter.config import parse_listen_address
from celery_obs.exporter.http import Limits, MetricsServer
from celery_obs.exporter.httpwire import negotiate, wants_gzip
from celery_obs.exporter.webconfig import WebConfigError, load_web_config

from support import ExporterProcess, free_port, http_get, run_exporter_cli, wait_for

PASSWORD = "correct horse"


def write_web_config(directory: Path, cert: Path, key: Path) -> Path:
    # Go's htpasswd writes $2y$; the exporter-toolkit accepts it and so must we.
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    hashed = "$2y$" + hashed[4:]
    path = directory / "web-config.yml"
    path.write_text(
        "tls_server_config:\n"
        f"  cert_file: {cert.name}\n"  # relative to the config file, as the toolkit does
        f"  key_file: {key.name}\n"
        "  min_version: TLS12\n"
        "http_server_config:\n"
        "  headers:\n"
        "    X-Content-Type-Options: nosniff\n"
        "basic_auth_users:\n"
        f"  prometheus: '{hashed}'\n"
    )
    return path


def write_tls_config(
    directory: Path, certificate: tuple[Path, Path], users: dict[str, str] | None = None
) -> Path:
    """Copy the certificate and its key into `directory`, with a web config serving them (and
    `users`: name -> bcrypt hash) next to them."""
    for source in certificate:
        shutil.copy(source, directory / source.name)
    path = directory / "web-config.yml"
    lines = [
        "tls_server_config:",
        f"  cert_file: {certificate[0].name}",
        f"  key_file: {certificate[1].name}",
    ]
    if users:
        lines += ["basic_auth_users:", *(f"  {name}: '{hashed}'" for name, hashed in users.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("celery_test_events", "A test counter.", registry=registry).inc(3)
    return registry


def serve(registry: CollectorRegistry, web_config=None, health=lambda: (True, "ok: fine")):
    server = MetricsServer(
        ("127.0.0.1", 0),
        lambda kind: (generate_latest(registry), CONTENT_TYPE_LATEST),
        health,
        web_config,
    )
    server.serve_in_thread()
    return server


@pytest.fixture
def tls_server(
    tmp_path: Path, certificate, registry
) -> Iterator[tuple[MetricsServer, ssl.SSLContext]]:
    cert, key = certificate
    for source in certificate:
        shutil.copy(source, tmp_path / source.name)
    server = serve(registry, load_web_config(str(write_web_config(tmp_path, cert, key))))
    client = ssl.create_default_context(cafile=str(cert))
    yield server, client
    server.shutdown()
    server.server_close()


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


BODY = b"# TYPE celery_test_events_total counter\ncelery_test_events_total 3.0\n" * 50


@contextmanager
def running(
    render: Callable[[str], tuple[bytes, str]] = lambda kind: (BODY, CONTENT_TYPE_LATEST),
    web_config=None,
    limits: Limits | None = None,
    health=lambda: (True, "ok: fine"),
    **options,
) -> Iterator[MetricsServer]:
    """A MetricsServer on a free 127.0.0.1 port, serving in a thread, closed afterwards."""
    server = MetricsServer(("127.0.0.1", 0), render, health, web_config, limits, **options)
    server.serve_in_thread()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def connect(server: MetricsServer, context: ssl.SSLContext | None = None, timeout: float = 10):
    sock = socket.create_connection(server.server_address[:2], timeout=timeout)
    return context.wrap_socket(sock, server_hostname="127.0.0.1") if context else sock


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def exchange(server: MetricsServer, data: bytes, context: ssl.SSLContext | None = None) -> bytes:
    """Send raw bytes, read everything the server answers until it closes."""
    with connect(server, context) as sock:
        sock.sendall(data)
        return read_all(sock)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def headers_of(response: bytes) -> dict[str, str]:
    head = response.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
    return {
        name.lower(): value.strip() for name, _, value in (line.partition(":") for line in head)
    }


def test_https_with_the_right_user_serves_metrics(tls_server) -> None:
    server, client = tls_server
    assert server.url.startswith("https://127.0.0.1:")
    for _ in range(2):  # the second request takes the verified-credentials cache
        status, body = http_get(f"{server.url}/metrics", basic("prometheus", PASSWORD), client)
        assert status == 200
        assert "celery_test_events_total 3.0" in body


def test_wrong_or_missing_credentials_get_401(tls_server) -> None:
    server, client = tls_server
    for headers in (
        {},
        basic("prometheus", "wrong"),
        basic("nobody", PASSWORD),
        {"Authorization": "Basic !!!notbase64"},
    ):
        status, body = http_get(f"{server.url}/metrics", headers, client)
        assert (status, body) == (401, "Unauthorized\n")


@pytest.mark.parametrize("healthy", [True, False])
def test_probes_without_credentials_get_up_or_down_but_not_the_reason(
    tmp_path, certificate, registry, healthy
) -> None:
    """Kubelet and Docker probes carry no credentials: with basic auth on, the probe paths
    still answer them (status only; the reason names the broker), and nothing else does."""
    cert, key = certificate
    for source in certificate:
        shutil.copy(source, tmp_path / source.name)
    reason = "ok: connected to redis://127.0.0.1:6379/0" if healthy else "not connected to x"
    server = serve(
        registry,
        load_web_config(str(write_web_config(tmp_path, cert, key))),
        health=lambda: (healthy, reason),
    )
    client = ssl.create_default_context(cafile=str(cert))
    status = 200 if healthy else 503
    terse = "ok\n" if healthy else "not ok: send credentials for the reason\n"
    try:
        for path in ("/readyz", "/healthz", "/readyz?verbose=1"):
            assert http_get(server.url + path, {}, client) == (status, terse)
            assert http_get(server.url + path, basic("prometheus", PASSWORD), client) == (
                status,
                reason + "\n",
            )
            assert http_get(server.url + path, basic("prometheus", "wrong"), client)[0] == 401
        assert http_get(server.url + "/livez", {}, client) == (200, "ok\n")
        for path in ("/metrics", "/", "/nowhere"):
            assert http_get(server.url + path, {}, client) == (401, "Unauthorized\n")
        connection = http.client.HTTPSConnection(
            "127.0.0.1", server.server_address[1], context=client, timeout=5
        )
        with contextlib.closing(connection):
            connection.request("HEAD", "/readyz")
            response = connection.getresponse()
            assert (response.status, response.read()) == (status, b"")
            assert response.headers["Content-Length"] == str(len(terse))
            for target in ("//readyz", "/readyz/", "/%72eadyz"):  # not the probe paths
                connection.request("GET", target)
                response = connection.getresponse()
                assert (response.status, response.read()) == (401, b"Unauthorized\n"), target
            connection.request("POST", "/livez")  # only reading is anonymous
            assert connection.getresponse().status == 401
    finally:
        server.shutdown()
        server.server_close()


def test_plain_http_to_the_https_port_is_refused(tls_server) -> None:
    server, _ = tls_server
    port = server.server_address[1]
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    with contextlib.closing(connection):
        connection.request("GET", "/metrics", headers=basic("prometheus", PASSWORD))
        response = connection.getresponse()
        assert response.status == 400
        assert response.read() == b"Client sent an HTTP request to an HTTPS server.\n"


def test_configured_headers_are_sent(tls_server) -> None:
    server, client = tls_server
    connection = http.client.HTTPSConnection(
        "127.0.0.1", server.server_address[1], context=client, timeout=5
    )
    with contextlib.closing(connection):
        connection.request("GET", "/healthz", headers=basic("prometheus", PASSWORD))
        response = connection.getresponse()
        assert response.getheader("X-Content-Type-Options") == "nosniff"
        assert response.read() == b"ok: fine\n"


def test_readyz_and_livez_answer_from_their_own_checks(registry) -> None:
    server = MetricsServer(
        ("127.0.0.1", 0),
        lambda kind: (generate_latest(registry), CONTENT_TYPE_LATEST),
        lambda: (False, "not connected to redis://h:6379// for 3s"),
        liveness=lambda: (True, "ok: alive, reconnecting to the broker"),
    )
    server.serve_in_thread()
    try:
        not_ready = (503, "not connected to redis://h:6379// for 3s\n")
        assert http_get(f"{server.url}/readyz") == not_ready
        assert http_get(f"{server.url}/healthz") == not_ready  # the old name of /readyz
        assert http_get(f"{server.url}/livez") == (200, "ok: alive, reconnecting to the broker\n")
        assert http_get(f"{server.url}/livez/") == (
            404,
            "Not found: try /metrics, /readyz or /livez\n",
        )
    finally:
        server.shutdown()
        server.server_close()


def test_healthz_reports_503_with_a_reason_and_gzip_works(registry) -> None:
    server = serve(registry, health=lambda: (False, "not connected to redis://h:6379// for 3s"))
    try:
        status, body = http_get(f"{server.url}/healthz")
        assert (status, body) == (503, "not connected to redis://h:6379// for 3s\n")
        connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=5)
        with contextlib.closing(connection):
            connection.request("GET", "/metrics", headers={"Accept-Encoding": "gzip"})
            response = connection.getresponse()
            assert response.getheader("Content-Encoding") == "gzip"
            assert b"celery_test_events_total 3.0" in gzip.decompress(response.read())
        assert http_get(f"{server.url}/nope")[0] == 404
    finally:
        server.shutdown()
        server.server_close()


def test_concurrent_scrapes(registry) -> None:
    server = serve(registry)
    results: list[int] = []
    threads = [
        threading.Thread(target=lambda: results.append(http_get(f"{server.url}/metrics")[0]))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    server.shutdown()
    server.server_close()
    assert results == [200] * 8


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("tls_server_config: [", "not valid YAML"),
        ("tls_server_config:\n  cert_file: a.crt\n", "needs both cert_file and key_file"),
        ("tls_server_config:\n  cert_file: no.crt\n  key_file: no.key\n", "cannot load cert_file"),
        ("basic_auth_users:\n  alice: plaintext\n", "basic_auth_users.alice: not a bcrypt hash"),
        ("tls_server_cfg: {}\n", "unknown key(s) in the web config: tls_server_cfg"),
        ("- a list\n", "the web config must be a mapping"),
    ],
)
def test_malformed_web_config_is_a_clear_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "web.yml"
    path.write_text(content)
    with pytest.raises(WebConfigError) as caught:
        load_web_config(str(path))
    assert str(caught.value).startswith(str(path))
    assert message in str(caught.value)


def test_exporter_cli_serves_https_with_basic_auth(tmp_path: Path, certificate) -> None:
    for source in certificate:
        shutil.copy(source, tmp_path / source.name)
    config = write_web_config(tmp_path, *certificate)
    exporter = ExporterProcess("memory://", "--web.config.file", str(config))
    try:
        url = f"https://127.0.0.1:{exporter.port}"
        client = ssl.create_default_context(cafile=str(certificate[0]))

        def serving() -> bool:
            try:
                return http_get(f"{url}/healthz", basic("prometheus", PASSWORD), client)[0] == 200
            except OSError:
                return False

        wait_for(serving, 30, "the exporter serving HTTPS")
        status, body = http_get(f"{url}/metrics", basic("prometheus", PASSWORD), client)
        assert status == 200
        assert "\ncelery_exporter_broker_connected 1\n" in body
        assert http_get(f"{url}/metrics", basic("prometheus", "nope"), client)[0] == 401
        assert http_get(f"http://127.0.0.1:{exporter.port}/metrics") == (
            400,
            "Client sent an HTTP request to an HTTPS server.\n",
        )
    finally:
        exporter.close()


@pytest.mark.parametrize(
    "mode", ["RequestClientCert", "RequireAnyClientCert", "RequireAndVerifyClientCert"]
)
def test_client_certificate_modes_need_a_ca(tmp_path: Path, certificate, mode: str) -> None:
    for source in certificate:
        shutil.copy(source, tmp_path / source.name)
    path = tmp_path / "web.yml"
    path.write_text(
        f"tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        f"  client_auth_type: {mode}\n"
    )
    with pytest.raises(WebConfigError, match=f"client_auth_type {mode} needs client_ca_file"):
        load_web_config(str(path))


def test_a_password_bcrypt_cannot_hash_is_a_401(tls_server) -> None:
    server, client = tls_server
    status, _ = http_get(f"{server.url}/metrics", basic("prometheus", "x" * 100), client)
    assert status == 401


def test_malformed_web_config_stops_the_cli_at_startup(tmp_path: Path) -> None:
    path = tmp_path / "web.yml"
    path.write_text("basic_auth_users:\n  alice: hunter2\n")
    result = run_exporter_cli(
        "--broker-url",
        "memory://",
        "--web.listen-address",
        f"127.0.0.1:{free_port()}",
        "--web.config.file",
        str(path),
    )
    assert result.returncode == 2
    assert result.stderr.strip().endswith(
        f"celery-obs: invalid --web.config.file: {path}: basic_auth_users.alice: not a bcrypt "
        "hash (want $2y$, $2b$ or $2a$, a cost, $ and 53 characters)"
    )


def test_missing_web_config_file(tmp_path: Path) -> None:
    with pytest.raises(WebConfigError, match="cannot read web config: No such file"):
        load_web_config(str(tmp_path / "absent.yml"))


@pytest.mark.parametrize(
    ("address", "expected"),
    [(":9808", ("0.0.0.0", 9808)), ("127.0.0.1:1", ("127.0.0.1", 1)), ("[::1]:80", ("::1", 80))],
)
def test_parse_listen_address(address: str, expected: tuple[str, int]) -> None:
    assert parse_listen_address(address) == expected


@pytest.mark.parametrize("address", ["9808", "host:", "h:99999", "h:x"])
def test_bad_listen_address(address: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_listen_address(address)


def test_wait_for_reports_the_last_value() -> None:
    with pytest.raises(AssertionError, match="waiting for nothing; last: 0"):
        wait_for(lambda: 0, 0.05, "nothing")


@pytest.mark.parametrize("path", ["/metrics", "/healthz", "/", "/nope"])
def test_head_answers_every_path_with_the_get_headers_and_no_body(path: str) -> None:
    with running() as server:
        get = exchange(server, f"GET {path} HTTP/1.1\r\nConnection: close\r\n\r\n".encode())
        head = exchange(server, f"HEAD {path} HTTP/1.1\r\nConnection: close\r\n\r\n".encode())
    assert status_of(head) == status_of(get)
    assert head.endswith(b"\r\n\r\n")
    assert head.count(b"\r\n\r\n") == 1
    head_headers, get_headers = headers_of(head), headers_of(get)
    for name in ("content-length", "content-type", "vary"):
        assert head_headers.get(name) == get_headers.get(name)
    assert int(get_headers["content-length"]) == len(get.split(b"\r\n\r\n", 1)[1]) > 0


@pytest.mark.parametrize(
    ("accept_encoding", "gzipped"),
    [
        ("gzip", True),
        ("GZIP", True),
        ("x-gzip", True),
        ("deflate, gzip;q=0.8", True),
        ("*", True),
        ("gzip;q=0", False),
        ("gzip; q=0.000", False),
        ("gzip;q=0.5, identity", False),
        ("*;q=0, identity", False),
        ("gzip;q=0, *", False),
        ("br;q=1, gzip;q=0.1", True),
        ("identity;q=0, *;q=0.1", True),
        ("gzip;q=nonsense", False),
        ("deflate, br", False),
        ("", False),
    ],
)
def test_accept_encoding_is_negotiated_with_q_values(accept_encoding: str, gzipped: bool) -> None:
    assert wants_gzip(accept_encoding) is gzipped
    with running() as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=5)
        with contextlib.closing(connection):
            connection.request("GET", "/metrics", headers={"Accept-Encoding": accept_encoding})
            response = connection.getresponse()
            body = response.read()
    assert response.status == 200
    assert response.getheader("Vary") == "Accept, Accept-Encoding"
    assert response.getheader("Content-Encoding") == ("gzip" if gzipped else None)
    assert (gzip.decompress(body) if gzipped else body) == BODY


#: What Prometheus 2.x sends (OpenMetrics first), and other scrapers' headers.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


@pytest.mark.parametrize(
    ("accept", "openmetrics"),
    [
        (PROMETHEUS_ACCEPT, True),
        ("application/openmetrics-text; version=1.0.0; charset=utf-8", True),
        ("application/openmetrics-text", True),
        ("application/openmetrics-text;version=0.0.1", True),
        ("application/openmetrics-text;version=2.0.0", False),  # not a version we write
        ("text/plain;version=0.0.4;q=0.5,application/openmetrics-text;q=0.5", False),  # tie
        ("text/plain, application/openmetrics-text;q=0.9", False),
        ("application/openmetrics-text;q=0", False),
        ("application/openmetrics-text;q=nonsense", False),
        ("*/*", False),
        ("", False),
        (None, False),
        ("APPLICATION/OPENMETRICS-TEXT; Q=0.9, */*;q=0.5", True),
        ("application/openmetrics-text;q=0.5, */*;q=0.8", False),  # anything, text included
        # A version we do not write listed first does not hide one we do.
        (
            "application/openmetrics-text;version=2.0.0;q=0.9,"
            "application/openmetrics-text;version=1.0.0;q=0.8",
            True,
        ),
        # Text ranked low (and a text version we do not write ranked high): OpenMetrics.
        (
            "text/plain;version=1.0.0;q=0.9,application/openmetrics-text;q=0.8,"
            "text/plain;version=0.0.4;q=0.1",
            True,
        ),
    ],
)
def test_accept_chooses_openmetrics_only_when_preferred(accept, openmetrics: bool) -> None:
    assert (negotiate(accept) == "openmetrics") is openmetrics


#: What Prometheus 2.42 sends with --enable-feature=native-histograms (protobuf first).
PROMETHEUS_NATIVE_ACCEPT = (
    "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited,"
    "application/openmetrics-text;version=1.0.0;q=0.8,application/openmetrics-text;"
    "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


@pytest.mark.parametrize(
    ("accept", "kind"),
    [
        (PROMETHEUS_NATIVE_ACCEPT, "protobuf"),
        (PROMETHEUS_ACCEPT, "openmetrics"),
        (None, "text"),
        ("application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily", "text"),
        ("application/vnd.google.protobuf;proto=other.Message;encoding=delimited", "text"),
        (
            "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=text",
            "text",
        ),  # the text protobuf encoding: not one we write
        (
            "Application/Vnd.Google.Protobuf; Proto=io.prometheus.client.MetricFamily; "
            "Encoding=delimited; q=0.9, text/plain;q=0.5",
            "protobuf",
        ),
        (
            "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;"
            "encoding=delimited;q=0.5,application/openmetrics-text;q=0.5",
            "openmetrics",
        ),  # tie
        (
            "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;"
            "encoding=delimited;q=0.5,*/*;q=0.5",
            "text",
        ),  # tie
    ],
)
def test_accept_chooses_protobuf_when_it_is_preferred(accept, kind) -> None:
    assert negotiate(accept) == kind


def test_each_format_is_rendered_and_labelled_as_asked() -> None:
    bodies = {
        "openmetrics": (b"om\n", "application/openmetrics-text"),
        "protobuf": (b"\x00", "application/vnd.google.protobuf"),
        "text": (BODY, "text/plain"),
    }

    with running(bodies.__getitem__) as server:
        for accept, (body, kind) in (
            (PROMETHEUS_ACCEPT, bodies["openmetrics"]),
            (PROMETHEUS_NATIVE_ACCEPT, bodies["protobuf"]),
            ("text/plain", bodies["text"]),
        ):
            connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1])
            with contextlib.closing(connection):
                connection.request("GET", "/metrics", headers={"Accept": accept})
                response = connection.getresponse()
                assert (response.read(), response.getheader("Content-Type")) == (body, kind)


def test_metrics_without_accept_encoding_is_identity_and_still_varies() -> None:
    with running() as server:
        response = exchange(server, b"GET /metrics HTTP/1.0\r\n\r\n")
    assert headers_of(response)["vary"] == "Accept, Accept-Encoding"
    assert "content-encoding" not in headers_of(response)
    assert response.split(b"\r\n\r\n", 1)[1] == BODY


def test_other_methods_get_405_naming_the_allowed_ones() -> None:
    with running() as server:
        response = exchange(server, b"POST /metrics HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi")
    assert status_of(response) == 405
    assert headers_of(response)["allow"] == "GET, HEAD"


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /metrics\r\n\r\n", 400),
        (b"GET /metrics HTTP/2.0\r\n\r\n", 505),
        (b"GET /metrics HTTP/1.1\r\nBad Header: x\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nNoColon\r\n\r\n", 400),
    ],
)
def test_malformed_requests_get_a_4xx_and_the_connection_closes(
    request_bytes: bytes, status: int
) -> None:
    with running() as server:
        response = exchange(server, request_bytes)
    assert status_of(response) == status
    assert headers_of(response)["connection"] == "close"


def test_keep_alive_serves_pipelined_requests_in_order() -> None:
    with running() as server, connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n\r\nHEAD /metrics HTTP/1.1\r\n\r\n")
        sock.sendall(b"GET /nope HTTP/1.1\r\nConnection: close\r\n\r\n")
        answers = read_all(sock)
    assert re.findall(rb"HTTP/1.1 (\d+)", answers) == [b"200", b"200", b"404"]


def test_an_absolute_form_target_is_served_by_its_path() -> None:
    with running() as server:
        response = exchange(server, b"GET http://127.0.0.1/healthz?x=1 HTTP/1.0\r\n\r\n")
    assert response.endswith(b"\r\n\r\nok: fine\n")


def test_render_failure_is_a_500_and_the_next_scrape_renders_again() -> None:
    calls = []

    def render(kind: str) -> tuple[bytes, str]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("tracker broke")
        return BODY, CONTENT_TYPE_LATEST

    with running(render) as server:
        assert http_get(f"{server.url}/metrics")[0] == 500
        assert http_get(f"{server.url}/metrics") == (200, BODY.decode())
