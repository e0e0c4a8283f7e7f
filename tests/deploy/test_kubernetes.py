"""deploy/kubernetes/base: built with kustomize as `kubectl apply -k` would, every object valid
against the Kubernetes schemas (strict: an unknown field fails), and hardened as promised."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess

import pytest
import yaml
from manifests import (
    COMPONENTS,
    KUBERNETES_VERSION,
    build,
    by_kind,
    needs_kubectl,
    overlay,
    secret_env,
)

from support import ROOT, keys_lost

pytestmark = needs_kubectl


def test_every_object_is_valid_against_the_kubernetes_schemas() -> None:
    validate = pytest.importorskip("kubernetes_validate")
    objects = build()
    assert sorted(obj["kind"] for obj in objects) == [
        "Deployment",
        "NetworkPolicy",
        "Service",
        "ServiceAccount",
    ]
    for obj in objects:
        validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_the_schemas_check_would_catch_a_misspelt_field() -> None:
    validate = pytest.importorskip("kubernetes_validate")
    service = by_kind(build())["Service"]
    service["spec"]["ports"][0]["targetPrt"] = "metrics"
    with pytest.raises(validate.ValidationError):
        validate.validate(service, KUBERNETES_VERSION, strict=True)


def test_the_exporter_runs_hardened_as_the_image_user() -> None:
    objects = by_kind(build())
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    uid = re.search(r"--uid (\d+)", (ROOT / "Dockerfile").read_text())
    assert uid
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": int(uid.group(1)),
        "runAsGroup": int(uid.group(1)),
        "fsGroup": int(uid.group(1)),
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert pod["automountServiceAccountToken"] is False
    assert objects["ServiceAccount"]["automountServiceAccountToken"] is False
    [container] = pod["containers"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert set(container["resources"]) == {"requests", "limits"}
    [env] = container["env"]
    assert env["name"] == "CELERY_OBS_BROKER_URL"  # never in the manifest, from a Secret
    assert env["valueFrom"]["secretKeyRef"] == {"name": "celery-exporter", "key": "broker-url"}


def test_probes_scrapes_and_the_network_policy_meet_at_the_metrics_port() -> None:
    objects = by_kind(build())
    [container] = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container["ports"] == [{"name": "metrics", "containerPort": 9808, "protocol": "TCP"}]
    # Ready while consuming; alive through a broker outage (see docs/exporter.md).
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "metrics"}
    [port] = objects["Service"]["spec"]["ports"]
    assert (port["name"], port["port"], port["targetPort"]) == ("metrics", 9808, "metrics")
    pods = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert objects["Service"]["spec"]["selector"].items() <= pods.items()
    policy = objects["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pods.items()
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert [p["port"] for rule in policy["ingress"] for p in rule["ports"]] == ["metrics"]
    egress = {p["port"] for rule in policy["egress"] for p in rule["ports"]}
    assert egress == {53, 6379, 26379, 5672, 5671}  # DNS and the brokers, nothing else


@pytest.mark.broker
def test_the_container_runs_as_kubernetes_would_run_it_and_its_probes_tell_the_truth(
    tmp_path,
) -> None:
    """The manifest's args and env (the Secret's data decoded, as the kubelet does), from a
    read-only working directory; its probes at the manifest's paths, broker up and down. The
    port is a free one here: in a pod, containerPort is the pod's own."""
    import sys

    from brokers import RedisServer
    from support import Process, free_port, http_get, wait_for

    [container] = by_kind(build())["Deployment"]["spec"]["template"]["spec"]["containers"]
    probes = {
        kind: container[f"{kind}Probe"]["httpGet"]["path"] for kind in ("liveness", "readiness")
    }
    server = RedisServer()
    env = secret_env(container, {"celery-exporter": {"broker-url": server.url().encode()}})
    port = free_port()
    env["CELERY_OBS_WEB_LISTEN_ADDRESS"] = f"127.0.0.1:{port}"
    workdir = tmp_path / "app"
    workdir.mkdir()
    workdir.chmod(0o555)  # readOnlyRootFilesystem: nothing may be written where it runs
    exporter = Process(
        [sys.executable, "-m", "celery_obs", *container["args"]], env=env, cwd=workdir
    )
    base = f"http://127.0.0.1:{port}"

    def probe(kind: str) -> tuple[int, str]:
        try:
            return http_get(base + probes[kind])
        except OSError as exc:
            return 0, str(exc)

    try:
        wait_for(lambda: probe("readiness")[0] == 200, 30, "ready with the broker up")
        assert probe("liveness")[0] == 200
        server.kill()
        wait_for(lambda: probe("readiness")[0] == 503, 30, "not ready with the broker down")
        assert probe("liveness") == (200, "ok: alive, reconnecting to the broker\n")
        server.start()
        wait_for(lambda: probe("readiness")[0] == 200, 30, "ready again")
        assert "broker-url" not in exporter.output()
        assert os.listdir(workdir) == []
    finally:
        exporter.close()
        server.close()
        workdir.chmod(0o755)


PROMETHEUS_RULE = COMPONENTS / "prometheus-rule" / "prometheusrule.yaml"


def test_the_prometheus_rule_is_what_the_generator_writes(tmp_path, capsys) -> None:
    from celery_obs import cli

    out = tmp_path / "rule.yaml"
    assert cli.main(["rules", "prometheus-rule", "--out", str(out)]) == 0
    capsys.readouterr()
    assert out.read_text() == PROMETHEUS_RULE.read_text(), (
        "stale: celery-obs rules prometheus-rule --out " + str(PROMETHEUS_RULE.relative_to(ROOT))
    )


def test_the_base_with_the_prometheus_rule_component_builds_and_its_rules_pass_promtool(
    tmp_path,
) -> None:
    objects = by_kind(overlay(tmp_path, ("prometheus-rule",)))
    rule = objects["PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    # Same rules as the compose stack's prometheus/rules/.
    shipped = [
        group
        for path in sorted((ROOT / "prometheus" / "rules").glob("*.yml"))
        for group in yaml.safe_load(path.read_text())["groups"]
    ]
    assert sorted(rule["spec"]["groups"], key=lambda g: g["name"]) == sorted(
        shipped, key=lambda g: g["name"]
    )
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    groups = tmp_path / "groups.yml"
    groups.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    result = subprocess.run(
        ["promtool", "check", "rules", str(groups)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


#: In the order docs/kubernetes.md lists them (web-config patches the ServiceMonitor: after it).
COMPONENT_NAMES = (
    "service-monitor",
    "prometheus-rule",
    "grafana-dashboards",
    "high-availability",
    "web-config",
)
#: Objects of the Prometheus Operator, checked against its models instead.
OPERATOR_KINDS = {"PrometheusRule", "ServiceMonitor"}


@pytest.mark.parametrize(
    "components",
    [
        combo
        for n in range(len(COMPONENT_NAMES) + 1)
        for combo in itertools.combinations(COMPONENT_NAMES, n)
    ],
    ids=lambda combo: "+".join(combo) or "base",
)
def test_every_component_combination_builds_and_validates(tmp_path, components) -> None:
    """Kubernetes objects against the Kubernetes schemas (strict); the Operator's objects
    against the Prometheus Operator's models (cloudcoil), losing no key on a round trip."""
    validate = pytest.importorskip("kubernetes_validate")
    operator = pytest.importorskip("cloudcoil.models.prometheus_operator.v1")
    objects = overlay(tmp_path, components)
    kinds = {obj["kind"] for obj in objects}
    assert ("PrometheusRule" in kinds) == ("prometheus-rule" in components)
    assert ("ServiceMonitor" in kinds) == ("service-monitor" in components)
    assert ("PodDisruptionBudget" in kinds) == ("high-availability" in components)
    assert ("ConfigMap" in kinds) == ("grafana-dashboards" in components)
    deployment = next(obj for obj in objects if obj["kind"] == "Deployment")
    volumes = [v["name"] for v in deployment["spec"]["template"]["spec"]["volumes"]]
    assert ("web-config" in volumes) == ("web-config" in components)
    for monitor in (obj for obj in objects if obj["kind"] == "ServiceMonitor"):
        [endpoint] = monitor["spec"]["endpoints"]
        assert endpoint.get("scheme", "http") == ("https" if "web-config" in components else "http")
    for obj in objects:
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "celery-observability"
        if obj["kind"] in OPERATOR_KINDS:
            model = getattr(operator, obj["kind"]).model_validate(obj)
            dumped = model.model_dump(mode="json", by_alias=True, exclude_none=True)
            assert keys_lost(obj, dumped) == [], obj["kind"]
        else:
            validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_the_service_monitor_scrapes_the_services_metrics_port(tmp_path) -> None:
    objects = by_kind(overlay(tmp_path, ("service-monitor",)))
    monitor, service = objects["ServiceMonitor"]["spec"], objects["Service"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["endpoints"]] == [
        p["name"] for p in service["spec"]["ports"]
    ]
    # The job label is the Service's name: the one the PrometheusRule's selector names.
    assert 'job="' + service["metadata"]["name"] + '"' in PROMETHEUS_RULE.read_text()


def test_high_availability_runs_two_apart_and_keeps_one_through_a_drain(tmp_path) -> None:
    objects = by_kind(overlay(tmp_path, ("high-availability",)))
    deployment = objects["Deployment"]["spec"]
    assert deployment["replicas"] == 2
    [term] = deployment["template"]["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    pods = deployment["template"]["metadata"]["labels"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= pods.items()
    budget = objects["PodDisruptionBudget"]["spec"]
    assert budget["minAvailable"] == 1
    assert budget["selector"]["matchLabels"].items() <= pods.items()


DASHBOARDS_CONFIGMAP = COMPONENTS / "grafana-dashboards" / "configmap.yaml"


def test_the_dashboards_configmap_holds_the_committed_dashboards_for_the_sidecar() -> None:
    pytest.importorskip("grafanalib")
    from celery_obs.dashboards import configmap

    text = DASHBOARDS_CONFIGMAP.read_text()
    assert text == configmap(), "stale: celery-obs dashboards --configmap " + str(
        DASHBOARDS_CONFIGMAP.relative_to(ROOT)
    )
    document = yaml.safe_load(text)
    assert document["metadata"]["labels"] == {"grafana_dashboard": "1"}
    files = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
    assert document["data"] == {path.name: path.read_text() for path in files}
    # kubectl apply keeps the whole object in an annotation of at most 256 KiB.
    assert len(text.encode()) < 250_000
