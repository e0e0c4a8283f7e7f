"""The web-config component: TLS and basic auth from the broker URL's Secret. Its container
runs as the kubelet would run it, the Secret laid out as the kubelet writes it: the probes
answer without credentials, Prometheus scrapes as the ServiceMonitor says, and a rotated
Secret is taken without a restart."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml
from manifests import by_kind, needs_kubectl, overlay, project_secret, secret_env

from support import Process, free_port, http_get, wait_for

pytestmark = needs_kubectl


def test_the_exporter_mounts_only_what_it_reads_from_the_one_secret(tmp_path) -> None:
    objects = by_kind(overlay(tmp_path, ("service-monitor", "web-config")))
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    [volume] = [v for v in pod["volumes"] if v["name"] == "web-config"]
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "web-config"]
    assert mount["readOnly"] is True
    secret_names = {ref["valueFrom"]["secretKeyRef"]["name"] for ref in container["env"]}
    assert secret_names == {volume["secret"]["secretName"]}, "one Secret, renamed by one patch"
    assert [i["key"] for i in volume["secret"]["items"]] == ["web-config.yml", "tls.crt", "tls.key"]
    assert volume["secret"]["defaultMode"] == 0o440  # readable through fsGroup, by nobody else
    assert f"--web.config.file={mount['mountPath']}/web-config.yml" in container["args"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["scheme"] == "HTTPS"
    [endpoint] = objects["ServiceMonitor"]["spec"]["endpoints"]
    refs = [
        endpoint["tlsConfig"]["ca"]["secret"],
        endpoint["basicAuth"]["username"],
        endpoint["basicAuth"]["password"],
    ]
    assert {ref["name"] for ref in refs} == secret_names
    # Prometheus' keys are not the exporter's: never mounted into its pod.
    assert not {ref["key"] for ref in refs} & {i["key"] for i in volume["secret"]["items"]}


def secret_references(objects: dict[str, dict[str, Any]]) -> list[str]:
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    [endpoint] = objects["ServiceMonitor"]["spec"]["endpoints"]
    return [
        *(variable["valueFrom"]["secretKeyRef"]["name"] for variable in container["env"]),
        *(v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v),
        endpoint["tlsConfig"]["ca"]["secret"]["name"],
        endpoint["basicAuth"]["username"]["name"],
        endpoint["basicAuth"]["password"]["name"],
    ]


def test_a_renamed_secret_is_renamed_everywhere_it_is_named(tmp_path) -> None:
    """A prefix and a generated Secret (its name hashed): the ServiceMonitor's references
    follow the Deployment's, or Prometheus would look for a Secret that is not there."""
    built = overlay(
        tmp_path,
        ("service-monitor", "web-config"),
        namePrefix="prod-",
        secretGenerator=[{"name": "celery-exporter", "literals": ["broker-url=redis://r:6379/0"]}],
    )
    [secret] = [obj for obj in built if obj["kind"] == "Secret"]
    assert secret["metadata"]["name"].startswith("prod-celery-exporter-")
    objects = by_kind(built)
    assert set(secret_references(objects)) == {secret["metadata"]["name"]}
    assert len(secret_references(objects)) == 5


def certificate_for(directory: Path, name: str) -> tuple[bytes, bytes]:
    """A self-signed certificate naming `name` (its own CA), and its key."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    request = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    request += ["-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}"]
    request += ["-addext", f"subjectAltName=DNS:{name}"]
    subprocess.run(request, check=True, capture_output=True)
    return cert.read_bytes(), key.read_bytes()


def secret_data(broker_url: str, cert: bytes, key: bytes, password: str) -> dict[str, bytes]:
    """The user's Secret, with every key the base and the web-config component name."""
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    web_config = {
        "tls_server_config": {"cert_file": "tls.crt", "key_file": "tls.key"},
        "basic_auth_users": {"prometheus": hashed},
    }
    return {
        "broker-url": broker_url.encode(),
        "web-config.yml": yaml.safe_dump(web_config).encode(),
        "tls.crt": cert,
        "tls.key": key,
        "ca.crt": cert,
        "scrape-username": b"prometheus",
        "scrape-password": password.encode(),
    }


def scrape_as_the_service_monitor_says(
    port: int, endpoint: dict[str, Any], secret: dict[str, bytes], password: str | None = None
) -> int:
    """GET /metrics the way Prometheus would with this endpoint: its scheme, its CA and server
    name from the Secret, its basic auth credentials from the Secret (or `password`)."""
    import base64

    assert endpoint["scheme"] == "https"
    tls = endpoint["tlsConfig"]
    context = ssl.create_default_context(cadata=secret[tls["ca"]["secret"]["key"]].decode())
    user = secret[endpoint["basicAuth"]["username"]["key"]]
    if password is None:
        password = secret[endpoint["basicAuth"]["password"]["key"]].decode()
    token = base64.b64encode(user + b":" + password.encode()).decode()
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=tls["serverName"]) as sock,
    ):
        sock.sendall(
            b"GET /metrics HTTP/1.1\r\nHost: exporter\r\nConnection: close\r\n"
            + f"Authorization: Basic {token}\r\n\r\n".encode()
        )
        head = sock.recv(64)
    return int(head.split(b" ", 2)[1])


@pytest.mark.broker
def test_https_probes_scrapes_and_a_rotated_secret_as_kubernetes_runs_them(tmp_path) -> None:
    from brokers import RedisServer

    objects = by_kind(overlay(tmp_path, ("service-monitor", "web-config")))
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    [volume] = [v for v in pod["volumes"] if v["name"] == "web-config"]
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "web-config"]
    [endpoint] = objects["ServiceMonitor"]["spec"]["endpoints"]
    cert, key = certificate_for(tmp_path, endpoint["tlsConfig"]["serverName"])
    server = RedisServer()
    secret = secret_data(server.url(), cert, key, "first password")
    mounted = tmp_path / "volume"  # stands for the mountPath
    project_secret(mounted, volume, secret)
    assert sorted(p.name for p in mounted.iterdir() if not p.name.startswith("..")) == [
        "tls.crt",
        "tls.key",
        "web-config.yml",
    ]
    env = secret_env(container, {volume["secret"]["secretName"]: secret})
    port = free_port()
    env["CELERY_OBS_WEB_LISTEN_ADDRESS"] = f"127.0.0.1:{port}"
    args = [arg.replace(mount["mountPath"], str(mounted)) for arg in container["args"]]
    exporter = Process([sys.executable, "-m", "celery_obs", *args], env=env, cwd=tmp_path)
    kubelet = ssl.create_default_context()  # the kubelet does not verify the certificate
    kubelet.check_hostname = False
    kubelet.verify_mode = ssl.CERT_NONE

    def probe(kind: str) -> tuple[int, str]:
        get = container[f"{kind}Probe"]["httpGet"]
        url = f"{get['scheme'].lower()}://127.0.0.1:{port}{get['path']}"
        try:
            return http_get(url, context=kubelet)
        except OSError as exc:
            return 0, str(exc)

    try:
        wait_for(lambda: probe("readiness") == (200, "ok\n"), 30, "ready, over HTTPS")
        assert probe("liveness") == (200, "ok\n")
        assert scrape_as_the_service_monitor_says(port, endpoint, secret) == 200
        assert scrape_as_the_service_monitor_says(port, endpoint, secret, "wrong") == 401

        rotated = secret_data(server.url(), cert, key, "second password")
        project_secret(mounted, volume, rotated)
        wait_for(
            lambda: scrape_as_the_service_monitor_says(port, endpoint, rotated) == 200,
            10,
            "the rotated password taken without a restart",
        )
        assert scrape_as_the_service_monitor_says(port, endpoint, secret) == 401
        assert exporter.proc.poll() is None
        output = exporter.output()
        assert "first password" not in output
        assert "second password" not in output
        assert "web config reloaded" in output
    finally:
        exporter.close()
        server.close()
