"""Basic auth tells nothing by its timing: an unknown user costs what a wrong password costs."""

from __future__ import annotations

import http.client
import statistics
import time
from pathlib import Path

import bcrypt
from test_http import basic, running

from celery_obs.exporter.webconfig import load_web_config

from support import http_get

PASSWORD = "correct horse"


def web_config(tmp_path: Path, cost: int):
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=cost)).decode()
    other = bcrypt.hashpw(b"another", bcrypt.gensalt(rounds=cost)).decode()
    path = tmp_path / "web.yml"
    path.write_text(f"basic_auth_users:\n  alice: '{hashed}'\n  bob: '{other}'\n")
    return load_web_config(str(path))


def timed_status(port: int, headers: dict[str, str]) -> tuple[int, float]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.connect()  # the TCP handshake is not part of what is compared
    started = time.perf_counter()
    connection.request("GET", "/metrics", headers=headers)
    response = connection.getresponse()
    response.read()
    elapsed = time.perf_counter() - started
    connection.close()
    return response.status, elapsed


def test_an_unknown_user_takes_as_long_as_a_wrong_password(tmp_path: Path) -> None:
    # Cost 10, as htpasswd's default: a check takes tens of milliseconds, far above the noise.
    with running(web_config=web_config(tmp_path, cost=10)) as server:
        port = server.server_address[1]
        unknown, wrong = [], []
        for attempt in range(7):  # interleaved, so that a busy moment hits both alike
            status, elapsed = timed_status(port, basic(f"mallory{attempt}", PASSWORD))
            assert status == 401
            unknown.append(elapsed)
            status, elapsed = timed_status(port, basic("alice", f"guess{attempt}"))
            assert status == 401
            wrong.append(elapsed)
        assert timed_status(port, basic("alice", PASSWORD))[0] == 200
    ratio = statistics.median(unknown) / statistics.median(wrong)
    assert 0.5 <= ratio <= 2.0, f"unknown/wrong median latency ratio {ratio:.2f}"


def test_names_close_to_a_user_and_the_decoy_never_let_anyone_in(tmp_path: Path) -> None:
    with running(web_config=web_config(tmp_path, cost=4)) as server:
        for user, password in [
            ("alic", PASSWORD),
            ("alice\0", PASSWORD),
            ("ALICE", PASSWORD),
            ("", PASSWORD),
            ("nobody", ""),  # the decoy hash is checked for unknown users: it matches nothing
            ("alice", PASSWORD + " "),
        ]:
            assert http_get(f"{server.url}/metrics", basic(user, password))[0] == 401, user
        lower_scheme = {"Authorization": basic("alice", PASSWORD)["Authorization"].lower()}
        assert http_get(f"{server.url}/metrics", lower_scheme)[0] == 401  # token is case-sensitive
        scheme_only = "basic " + basic("alice", PASSWORD)["Authorization"].split(" ", 1)[1]
        assert http_get(f"{server.url}/metrics", {"Authorization": scheme_only})[0] == 200
