"""Certificates and users rotate without a restart: the web config is re-read when its files
change, or on SIGHUP; a reload that fails keeps the previous config and says why, once."""

from __future__ import annotations

import io
import logging
import os
import signal
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest
from test_http import basic, running, write_tls_config

from celery_obs.exporter.webconfig import WebConfigWatcher, load_web_config, stamp

from support import ExporterProcess, http_get, wait_for


def bcrypt_hash(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()


@pytest.fixture(scope="module")
def second_certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Another self-signed certificate for 127.0.0.1, to rotate to."""
    directory = tmp_path_factory.mktemp("tls-next")
    cert, key = directory / "next.crt", directory / "next.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """What exporter.webconfig logs, one record a line."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("celery_obs.exporter.webconfig")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(old_level)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def replace(path: Path, text: str) -> None:
    """Write as operators and Kubernetes do: a new file renamed over the old one."""
    staged = path.with_name(path.name + ".new")
    staged.write_text(text)
    os.replace(staged, path)


def test_a_changed_file_is_seen_once_the_interval_has_passed(tmp_path: Path) -> None:
    path = tmp_path / "web.yml"
    path.write_text(f"basic_auth_users:\n  alice: '{bcrypt_hash('one')}'\n")
    clock = FakeClock()
    watcher = WebConfigWatcher(load_web_config(str(path)), interval=1.0, clock=clock)
    first = watcher.current()
    replace(path, f"basic_auth_users:\n  bob: '{bcrypt_hash('two')}'\n")
    clock.now += 0.5
    assert watcher.current() is first  # not looked at more than once a second
    clock.now += 0.5
    assert sorted(watcher.current().basic_auth_users) == ["bob"]


def test_a_failed_reload_keeps_the_previous_config_and_logs_its_reason_once(
    tmp_path: Path, log_lines: io.StringIO
) -> None:
    path = tmp_path / "web.yml"
    good = f"basic_auth_users:\n  alice: '{bcrypt_hash('one')}'\n"
    path.write_text(good)
    clock = FakeClock()
    watcher = WebConfigWatcher(load_web_config(str(path)), interval=1.0, clock=clock)
    first = watcher.current()
    replace(path, "basic_auth_users:\n  alice: '$2y$10$truncated'\n")
    for _ in range(5):
        clock.now += 1.0
        assert watcher.current() is first
    assert log_lines.getvalue().splitlines() == [
        f"ERROR web config not reloaded, the previous one stays in force: {path}: "
        "basic_auth_users.alice: a bcrypt hash is 60 characters long, this one 16 (truncated?)"
    ]
    replace(path, good.replace("alice", "carol"))
    clock.now += 1.0
    assert sorted(watcher.current().basic_auth_users) == ["carol"]
    assert log_lines.getvalue().splitlines()[-1] == f"INFO web config reloaded from {path}"


def test_a_change_to_a_file_the_config_names_is_seen(
    tmp_path: Path, certificate, second_certificate
) -> None:
    path = write_tls_config(tmp_path, certificate)
    clock = FakeClock()
    watcher = WebConfigWatcher(load_web_config(str(path)), interval=1.0, clock=clock)
    first = watcher.current()
    replace(tmp_path / "server.key", second_certificate[1].read_text())  # key without its cert
    clock.now += 1.0
    assert watcher.current() is first  # a mismatched pair is refused; the old one serves
    replace(tmp_path / "server.crt", second_certificate[0].read_text())
    clock.now += 1.0
    assert watcher.current() is not first
    assert watcher.current().ssl_context is not None


def test_switching_between_http_and_https_needs_a_restart(tmp_path: Path, certificate) -> None:
    path = tmp_path / "web.yml"
    path.write_text("basic_auth_users: {}\n")
    watcher = WebConfigWatcher(load_web_config(str(path)))
    write_tls_config(tmp_path, certificate)
    os.replace(tmp_path / "web-config.yml", path)
    assert watcher.reload() is False
    assert watcher.current().ssl_context is None


def _trusting(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))


def _answers(url: str, headers: dict[str, str], context: ssl.SSLContext) -> int:
    try:
        return http_get(url, headers, context)[0]
    except OSError:  # includes a certificate the client does not trust
        return 0


def test_rotated_certificate_and_users_are_served_to_new_connections(
    tmp_path: Path, certificate, second_certificate
) -> None:
    path = write_tls_config(tmp_path, certificate, {"alice": bcrypt_hash("one")})
    with running(web_config=load_web_config(str(path))) as server:
        url = f"{server.url}/metrics"
        old_ca, new_ca = _trusting(certificate[0]), _trusting(second_certificate[0])
        assert _answers(url, basic("alice", "one"), old_ca) == 200
        # Certificate and key first (new key file, then its cert), then the users.
        replace(tmp_path / "server.key", second_certificate[1].read_text())
        replace(tmp_path / "server.crt", second_certificate[0].read_text())
        replace(path, path.read_text().replace("alice", "bob"))
        wait_for(lambda: _answers(url, basic("bob", "one"), new_ca) == 200, 10, "the new pair")
        assert _answers(url, basic("alice", "one"), new_ca) == 401
        assert _answers(url, basic("bob", "one"), old_ca) == 0  # the old certificate is gone


def test_sighup_forces_a_reload_and_a_bad_one_keeps_the_exporter_serving(
    tmp_path: Path, certificate, redis_url: str
) -> None:
    path = write_tls_config(tmp_path, certificate, {"alice": bcrypt_hash("one")})
    exporter = ExporterProcess(redis_url, "--web.config.file", str(path))
    try:
        url = f"https://127.0.0.1:{exporter.port}/metrics"
        client = _trusting(certificate[0])
        wait_for(lambda: _answers(url, basic("alice", "one"), client) == 200, 30, "serving")

        # Same inode, size and mtime: only SIGHUP can tell that this file changed.
        before = os.stat(path)
        path.write_text(
            path.read_text().replace(path.read_text().split("'")[1], bcrypt_hash("two"))
        )
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert stamp(str(path)) == (
            str(path),
            before.st_dev,
            before.st_ino,
            before.st_size,
            before.st_mtime_ns,
        )

        exporter.signal(signal.SIGHUP)
        wait_for(lambda: _answers(url, basic("alice", "two"), client) == 200, 10, "reloaded")
        assert exporter.proc.poll() is None
        assert "web config reloaded from" in exporter.output()

        replace(path, "basic_auth_users:\n  alice: '$2y$10$truncated'\n")
        exporter.signal(signal.SIGHUP)
        wait_for(lambda: "this one 16 (truncated?)" in exporter.output(), 10, "the reason logged")
        assert _answers(url, basic("alice", "two"), client) == 200
        assert exporter.proc.poll() is None
    finally:
        exporter.close()
