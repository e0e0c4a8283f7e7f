"""The image's HEALTHCHECK: the exporter's /livez when the container runs it, else healthy."""

from __future__ import annotations

import subprocess
import sys

import pytest

from celery_obs.healthcheck import livez_url

from support import ExporterProcess, wait_for


@pytest.mark.parametrize(
    ("argv", "environ", "expected"),
    [
        (["celery-obs", "exporter"], {}, "http://127.0.0.1:9808/livez"),
        (["/sbin/docker-init", "--", "celery-obs", "exporter"], {}, "http://127.0.0.1:9808/livez"),
        (
            ["celery-obs", "exporter", "--web.listen-address", "0.0.0.0:9100"],
            {},
            "http://127.0.0.1:9100/livez",
        ),
        (
            ["celery-obs", "exporter", "--web.listen-address=[::]:9100"],
            {},
            "http://[::1]:9100/livez",
        ),
        (
            ["celery-obs", "exporter"],
            {"CELERY_OBS_WEB_LISTEN_ADDRESS": "10.0.0.5:9200"},
            "http://10.0.0.5:9200/livez",
        ),
        (
            ["celery-obs", "exporter", "--web.config.file", "/etc/web.yml"],
            {},
            "https://127.0.0.1:9808/livez",
        ),
        (
            ["celery-obs", "exporter"],
            {"CELERY_OBS_WEB_CONFIG_FILE": ""},  # empty: unset, as the exporter reads it
            "http://127.0.0.1:9808/livez",
        ),
        (
            ["celery-obs", "exporter", "--web.config.file="],  # the flag wins, even empty
            {"CELERY_OBS_WEB_CONFIG_FILE": "/etc/web.yml"},
            "http://127.0.0.1:9808/livez",
        ),
        (["celery", "-A", "proj", "worker"], {}, None),
        (["celery-obs", "setup", "kibana"], {}, None),
    ],
)
def test_the_check_asks_the_exporter_where_it_listens(argv, environ, expected) -> None:
    assert livez_url(argv, environ) == expected


@pytest.mark.parametrize(
    ("text", "scheme"),
    [
        ("tls_server_config:\n  cert_file: c\n  key_file: k\n", "https"),
        ("basic_auth_users:\n  p: x\n", "http"),
        ("# nothing yet\n", "http"),  # a valid config without TLS, as the exporter reads it
        ("", "http"),
    ],
)
def test_the_check_speaks_https_only_when_the_web_config_serves_it(tmp_path, text, scheme):
    config = tmp_path / "web.yml"
    config.write_text(text)
    argv = ["celery-obs", "exporter", "--web.config.file", str(config)]
    assert livez_url(argv, {}) == f"{scheme}://127.0.0.1:9808/livez"


def run_check(
    tmp_path, *argv: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    cmdline = tmp_path / "cmdline"
    cmdline.write_bytes(b"\0".join(arg.encode() for arg in argv) + b"\0")
    return subprocess.run(
        [sys.executable, "-m", "celery_obs.healthcheck", str(cmdline)],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.broker
def test_a_running_exporter_is_healthy_and_a_gone_one_is_not(tmp_path, redis_url) -> None:
    exporter = ExporterProcess(redis_url)
    try:
        exporter.wait_healthy()
        address = f"127.0.0.1:{exporter.port}"
        ran = run_check(tmp_path, "celery-obs", "exporter", "--web.listen-address", address)
        assert (ran.returncode, ran.stdout) == (
            0,
            f"http://{address}/livez: ok: alive, consuming events\n",
        )
    finally:
        exporter.close()
    gone = run_check(tmp_path, "celery-obs", "exporter", "--web.listen-address", address)
    assert gone.returncode == 1
    assert "Connection refused" in gone.stdout
    worker = run_check(tmp_path, "celery", "-A", "proj", "worker")
    assert (worker.returncode, worker.stdout) == (0, "")


@pytest.mark.broker
@pytest.mark.parametrize("tls", [True, False], ids=["tls-and-auth", "auth-only"])
def test_the_check_needs_no_credentials_over_http_or_https(
    tmp_path, redis_url, certificate, tls
) -> None:
    """With basic auth on, /livez still answers a check that has no credentials; the check
    speaks HTTPS only when the web config serves TLS."""
    import shutil

    import bcrypt

    hashed = bcrypt.hashpw(b"secret", bcrypt.gensalt(rounds=4)).decode()
    lines = [f"basic_auth_users:\n  prometheus: '{hashed}'\n"]
    if tls:
        for source in certificate:
            shutil.copy(source, tmp_path / source.name)
        lines.append(
            f"tls_server_config:\n  cert_file: {certificate[0].name}\n"
            f"  key_file: {certificate[1].name}\n"
        )
    config = tmp_path / "web-config.yml"
    config.write_text("".join(lines))
    exporter = ExporterProcess(redis_url, "--web.config.file", str(config))
    address = f"127.0.0.1:{exporter.port}"
    argv = ("celery-obs", "exporter", "--web.listen-address", address, "--web.config.file")
    argv += (str(config),)
    try:
        wait_for(lambda: run_check(tmp_path, *argv).returncode == 0, 30, "the check passes")
        scheme = "https" if tls else "http"
        assert run_check(tmp_path, *argv).stdout == f"{scheme}://{address}/livez: ok\n"
    finally:
        exporter.close()
