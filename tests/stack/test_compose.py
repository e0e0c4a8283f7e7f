"""docker-compose.yml and the project image: valid, and consistent with every file they use.

No Docker engine runs here. Debian's docker-compose validates the file (`config -q`); the rest
reads the YAML, resolves its variables with .env.example as compose would, and cross-checks
ports, URLs, mounts and start-up order against the configs the services load. The compose
helpers (demo app and load, alert receiver, kibana_system step) run for real. Bringing the
stack up is .github/workflows/e2e.yml's job, with scripts/e2e-check.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from celery_obs.assets import ASSET_DIRS
from celery_obs.exporter.metrics import BY_NAME

from support import ROOT, Process, free_port, http_get, wait_for

COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DEMO = ROOT / "compose" / "demo"

#: The only services a user's browser needs, and their container ports.
UIS = {"grafana": 3000, "prometheus": 9090, "alertmanager": 9093, "kibana": 5601}
SECRETS = {"ELASTIC_PASSWORD", "KIBANA_SYSTEM_PASSWORD", "GRAFANA_ADMIN_PASSWORD"}

VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|(?P<bare>\w+))"
)


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
            values[key.strip()] = value.strip()
    return values


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's variable syntax: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}."""

    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name, op = match["braced"] or match["bare"], match["op"]
        value = env.get(name)
        missing = not value if op in (":-", ":?") else value is None
        if not missing:
            return str(value)
        if op in (":-", "-"):
            return match["arg"]
        if op in (":?", "?"):
            raise KeyError(f"{name} is required: {match['arg']}")
        return ""

    return VARIABLE.sub(replace, text)


def resolve(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, dict):
        return {key: resolve(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [resolve(item, env) for item in node]
    return interpolate(node, env) if isinstance(node, str) else node


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)
    elif isinstance(node, str):
        yield node


RAW = yaml.safe_load(COMPOSE_FILE.read_text())  # PyYAML resolves the x-* anchors and merges
ENV = read_env_file(ENV_EXAMPLE)
CONFIG = resolve(RAW, ENV)
SERVICES: dict[str, dict[str, Any]] = CONFIG["services"]


def mounts(service: str) -> list[tuple[str, str]]:
    """(source, target) of each volume entry: source is ./path for binds, a name otherwise."""
    return [tuple(entry.split(":")[:2]) for entry in SERVICES[service].get("volumes", [])]


def bind_source(service: str, target: str) -> Path:
    sources = [source for source, t in mounts(service) if t == target and source.startswith(".")]
    assert len(sources) == 1, f"{service} has no bind mount at {target}: {mounts(service)}"
    return ROOT / sources[0]


def environment(service: str) -> dict[str, str]:
    env = SERVICES[service].get("environment", {})
    assert isinstance(env, dict), f"{service}: write environment as a mapping"
    return {key: str(value) for key, value in env.items()}


def one_shot(service: str) -> bool:
    return SERVICES[service].get("restart") == "no"


def host_port(url: str) -> tuple[str, int]:
    parsed = urllib.parse.urlsplit(url)
    assert parsed.hostname, url
    assert parsed.port, url
    return parsed.hostname, parsed.port


def command_option(service: str, option: str) -> str:
    values = [
        arg.split("=", 1)[1]
        for arg in SERVICES[service].get("command", [])
        if arg.startswith(f"{option}=")
    ]
    assert len(values) == 1, f"{service}: expected one {option}=..., got {values}"
    return values[0]


# ---------------------------------------------------------------- the file itself


def compose_env() -> dict[str, str]:
    # A developer's exported ELASTIC_PASSWORD etc. would beat the env file; leave them out.
    return {key: value for key, value in os.environ.items() if key not in ENV}


needs_docker_compose = pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="docker-compose not installed (scripts/test installs Debian's docker-compose)",
)


def docker_compose(env_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker-compose", "--env-file", str(env_file), "-f", str(COMPOSE_FILE), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=compose_env(),
        timeout=60,
    )


@needs_docker_compose
def test_docker_compose_accepts_the_file_and_resolves_it_as_we_do() -> None:
    result = docker_compose(ENV_EXAMPLE, "config", "-q")
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(docker_compose(ENV_EXAMPLE, "config").stdout)["services"]
    assert set(resolved) == set(SERVICES)
    for name, service in SERVICES.items():
        assert resolved[name].get("image") == service.get("image"), name
        assert resolved[name].get("environment", {}) == environment(name), name


@needs_docker_compose
def test_without_env_file_compose_stops_and_says_what_to_do(tmp_path: Path) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = docker_compose(empty, "config", "-q")
    assert result.returncode != 0
    assert "in .env (cp .env.example .env)" in result.stderr, result.stderr


def test_secrets_are_required_and_everything_else_has_the_documented_default() -> None:
    required, defaults = set(), {}
    for text in strings(RAW):
        for match in VARIABLE.finditer(text):
            if match["escaped"]:
                continue
            name, op = match["braced"] or match["bare"], match["op"]
            assert op in (":-", ":?"), f"${{{name}}} needs :-default or :?message in {text!r}"
            if op == ":?":
                required.add(name)
            else:
                defaults.setdefault(name, set()).add(match["arg"])
    assert required == SECRETS
    # .env.example lists every variable, with the value compose uses when it is absent.
    assert set(ENV) == required | set(defaults) | {"COMPOSE_PROJECT_NAME"}
    assert {name: {ENV[name]} for name in defaults} == defaults


# ---------------------------------------------------------------- mounts and volumes


def test_every_bind_mounted_path_exists_in_the_repo() -> None:
    binds = [
        (name, source, target)
        for name in SERVICES
        for source, target in mounts(name)
        if source.startswith(".")
    ]
    assert len(binds) == 8
    for name, source, target in binds:
        path = ROOT / source
        assert path.exists(), f"{name} mounts {source}, which does not exist"
        # A file mounted where the image expects a file; a directory where it expects one.
        assert path.is_file() == bool(Path(target).suffix), f"{name}: {source} -> {target}"


def test_named_volumes_are_declared_and_used() -> None:
    used = {source for name in SERVICES for source, _ in mounts(name) if not source.startswith(".")}
    assert used == set(CONFIG["volumes"])
    # Everything that keeps data across restarts has a named volume.
    assert used == {
        "es-data",
        "logstash-data",
        "prometheus-data",
        "alertmanager-data",
        "grafana-data",
        "log-spool",
    }


# ---------------------------------------------------------------- ports


def test_only_the_uis_are_published_and_only_on_bind_address() -> None:
    published = {name: s["ports"] for name, s in RAW["services"].items() if "ports" in s}
    assert published == {
        name: [f"${{BIND_ADDRESS:-127.0.0.1}}:${{{name.upper()}_PORT:-{port}}}:{port}"]
        for name, port in UIS.items()
    }
    assert ENV["BIND_ADDRESS"] == "127.0.0.1"


def test_prometheus_scrapes_the_port_the_exporter_listens_on() -> None:
    prometheus_dir = bind_source("prometheus", "/etc/prometheus")
    assert command_option("prometheus", "--config.file") == "/etc/prometheus/prometheus.yml"
    config = yaml.safe_load((prometheus_dir / "prometheus.yml").read_text())
    listen = environment("exporter")["CELERY_OBS_WEB_LISTEN_ADDRESS"]
    port = int(listen.rsplit(":", 1)[1])
    targets = [
        target
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    ]
    assert targets == [f"exporter:{port}"]
    assert f"http://127.0.0.1:{port}/healthz" in " ".join(
        SERVICES["exporter"]["healthcheck"]["test"]
    )
    for rule_file in config["rule_files"]:
        assert (prometheus_dir / rule_file).is_file(), rule_file


def test_prometheus_alerts_go_to_alertmanager_and_on_to_the_webhook() -> None:
    config = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())
    targets = [
        target
        for manager in config["alerting"]["alertmanagers"]
        for static in manager["static_configs"]
        for target in static["targets"]
    ]
    assert targets == [f"alertmanager:{UIS['alertmanager']}"]
    config_path = command_option("alertmanager", "--config.file")
    alertmanager = yaml.safe_load(bind_source("alertmanager", config_path).read_text())
    urls = [
        hook["url"]
        for receiver in alertmanager["receivers"]
        for hook in receiver.get("webhook_configs", [])
    ]
    assert len(urls) == 1
    host, port = host_port(urls[0])
    assert host == "alert-webhook"
    assert command_option("alert-webhook", "--port") == str(port)
    assert urllib.parse.urlsplit(urls[0]).path == "/alerts"


@pytest.mark.skipif(shutil.which("amtool") is None, reason="amtool not installed")
def test_alertmanager_config_is_valid() -> None:
    path = bind_source("alertmanager", command_option("alertmanager", "--config.file"))
    result = subprocess.run(["amtool", "check-config", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards() -> None:
    datasources_dir = bind_source("grafana", "/etc/grafana/provisioning/datasources")
    datasources = yaml.safe_load((datasources_dir / "prometheus.yml").read_text())["datasources"]
    assert [d["url"] for d in datasources] == [f"http://prometheus:{UIS['prometheus']}"]
    providers_dir = bind_source("grafana", "/etc/grafana/provisioning/dashboards")
    providers = yaml.safe_load((providers_dir / "celery.yml").read_text())["providers"]
    [path] = [p["options"]["path"] for p in providers]
    dashboards = bind_source("grafana", path)
    assert dashboards == ROOT / "grafana" / "dashboards"
    home = environment("grafana")["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (dashboards / Path(home).relative_to(path)).is_file()


# ---------------------------------------------------------------- logs


def block(text: str, name: str) -> str:
    """The body of the first `name { ... }` block of a Logstash config (braces matched)."""
    match = re.search(rf"(?m)^\s*{name}\s*\{{", text)
    assert match, f"no {name} {{ }} block"
    depth, quoted = 1, None
    for i in range(match.end(), len(text)):
        char = text[i]
        if quoted:
            quoted = None if char == quoted else quoted
        elif char in "\"'":
            quoted = char
        elif char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[match.end() : i]
    raise AssertionError(f"unbalanced braces after {name}")


def test_block_parser_matches_nested_braces() -> None:
    text = 'input {\n  http {\n    additional_codecs => { "a" => "json" }\n    port => 1 }\n}\n'
    assert block(block(text, "input"), "http").strip().endswith("port => 1")


def test_worker_ships_to_the_port_of_logstash_http_input() -> None:
    pipeline_dir = bind_source("logstash", "/usr/share/logstash/pipeline")
    conf = re.sub(r"(?m)#.*$", "", (pipeline_dir / "celery.conf").read_text())
    http_input = block(block(conf, "input"), "http")
    # `port => 8080` or, with an environment override, `port => "${HTTP_PORT:8080}"`.
    port = re.search(r'port\s*=>\s*"?(?:\$\{\w+:)?(\d+)', http_input)
    assert port, http_input
    outputs = environment("worker")["CELERY_OBS_LOG_OUTPUT"].split(",")
    assert outputs[0] == "stdout"
    [shipped] = [o for o in outputs if o.startswith("http")]
    assert host_port(shipped) == ("logstash", int(port[1]))


def test_logstash_loads_the_mounted_pipeline_and_settings() -> None:
    config_dir = "/usr/share/logstash/config"
    for name in ("logstash.yml", "pipelines.yml"):
        assert bind_source("logstash", f"{config_dir}/{name}") == ROOT / "logstash/config" / name
    pipelines = yaml.safe_load((ROOT / "logstash/config/pipelines.yml").read_text())
    for pipeline in pipelines:
        # Every path.config lies in the mounted pipeline directory and names a file there.
        path = Path(pipeline["path.config"])
        assert path.parent == Path("/usr/share/logstash/pipeline"), path
        assert list((ROOT / "logstash/pipeline").glob(path.name)), path


def test_the_worker_spool_is_a_volume_the_image_user_owns() -> None:
    spool = environment("worker")["CELERY_OBS_LOG_SPOOL_DIR"]
    assert ("log-spool", spool) in mounts("worker")
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"mkdir -p {spool}" in dockerfile
    assert f"chown celery-obs:celery-obs {spool}" in dockerfile


# ---------------------------------------------------------------- start-up order


def test_depends_on_names_services_that_can_meet_the_condition() -> None:
    conditions = {
        (name, dependency, spec["condition"])
        for name, service in SERVICES.items()
        for dependency, spec in service.get("depends_on", {}).items()
    }
    for name, dependency, condition in conditions:
        assert dependency in SERVICES, f"{name} depends on unknown {dependency}"
        if condition == "service_healthy":
            assert "healthcheck" in SERVICES[dependency], f"{name} waits for {dependency}"
        else:
            assert condition == "service_completed_successfully", (name, condition)
            assert one_shot(dependency), f"{name} waits for {dependency} to exit"
    # The order the stack relies on: kibana_system's password and the index templates exist
    # before Kibana and Logstash start; Kibana serves before its objects are imported.
    assert {
        ("logstash", "setup-elasticsearch", "service_completed_successfully"),
        ("kibana", "setup-elasticsearch", "service_completed_successfully"),
        ("setup-elasticsearch", "elasticsearch", "service_healthy"),
        ("setup-kibana", "kibana", "service_healthy"),
        ("grafana", "prometheus", "service_healthy"),
        ("prometheus", "alertmanager", "service_healthy"),
    } <= conditions


def test_every_long_running_service_has_a_health_check() -> None:
    assert {name for name in SERVICES if one_shot(name)} == {"setup-elasticsearch", "setup-kibana"}
    for name, service in SERVICES.items():
        assert one_shot(name) or "healthcheck" in service, name
        assert one_shot(name) or service["restart"] == "unless-stopped", name


def test_kibana_logs_in_as_kibana_system_with_the_password_the_setup_sets() -> None:
    kibana = environment("kibana")
    assert kibana["ELASTICSEARCH_USERNAME"] == "kibana_system"
    assert RAW["services"]["kibana"]["environment"]["ELASTICSEARCH_PASSWORD"].startswith(
        "${KIBANA_SYSTEM_PASSWORD:?"
    )
    setup = environment("setup-elasticsearch")
    assert setup["KIBANA_SYSTEM_PASSWORD"] == kibana["ELASTICSEARCH_PASSWORD"]
    setup_command = " ".join(SERVICES["setup-elasticsearch"]["command"])
    assert setup_command.startswith("python /app/compose/setup/kibana_system_password.py && ")
    assert "celery-obs setup elasticsearch --wait 300" in setup_command
    assert SERVICES["setup-kibana"]["command"] == ["setup", "kibana", "--wait", "300"]
    # Passwords reach the setup jobs through the environment only: argv shows in `ps`.
    assert "--password" not in setup_command + " ".join(SERVICES["setup-kibana"]["command"])
    for service in ("setup-elasticsearch", "logstash", "kibana"):
        urls = [v for k, v in environment(service).items() if k.endswith(("_URL", "_HOSTS"))]
        assert urls, service
        assert all(host_port(u) == ("elasticsearch", 9200) for u in urls), service
    assert host_port(environment("setup-kibana")["KIBANA_URL"]) == ("kibana", UIS["kibana"])


# ---------------------------------------------------------------- images


def test_images_are_pinned_and_elastic_versions_agree() -> None:
    built = {name for name, service in SERVICES.items() if "build" in service}
    assert built == {
        "worker",
        "load",
        "exporter",
        "alert-webhook",
        "setup-elasticsearch",
        "setup-kibana",
    }
    for name in built:
        # An image name shared by several built services breaks Compose v2's bake builds.
        assert SERVICES[name]["build"] == ".", name
        assert "image" not in SERVICES[name], name
    images = {name: service["image"] for name, service in SERVICES.items() if name not in built}
    for name, image in images.items():
        tag = image.rsplit(":", 1)[1]
        assert tag != "latest", (name, image)
        assert re.search(r"\d", tag), (name, image)
    elastic = {images[name].rsplit(":", 1)[1] for name in ("elasticsearch", "logstash", "kibana")}
    assert elastic == {ENV["ELASTIC_VERSION"]}


def test_dockerfile_runs_as_a_user_and_copies_what_exists() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    allowed = {
        line[1:].strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    copied = [
        source
        for line in dockerfile.splitlines()
        if line.startswith("COPY ")
        for source in line.split()[1:-1]
    ]
    assert len(copied) == 12
    for source in copied:
        assert (ROOT / source).exists(), source
        assert source.rstrip("/").split("/")[0] in allowed, f"{source} is excluded by .dockerignore"
    # What the wheel packs (setup.py) must reach the build.
    for name in ("setup.py", "MANIFEST.in", *ASSET_DIRS):
        assert any(source.rstrip("/") == name for source in copied), name
    # A numeric user: Kubernetes' runAsNonRoot rejects a named one it cannot check.
    uid = re.search(r"useradd --system --uid (\d+) --user-group", dockerfile)
    assert uid
    assert re.search(rf"(?m)^USER {uid.group(1)}:{uid.group(1)}$", dockerfile)
    labels = dict(re.findall(r'org\.opencontainers\.image\.(\w+)="([^"]*)"', dockerfile))
    assert {"title", "description", "licenses", "source"} <= set(labels)
    license_ = re.search(r'license = \{ text = "([^"]+)" \}', (ROOT / "pyproject.toml").read_text())
    assert license_
    assert labels["licenses"] == license_.group(1)
    assert 'ENTRYPOINT ["celery-obs"]' in dockerfile
    # The role-aware check of tests/test_healthcheck.py.
    assert 'CMD ["python", "-m", "celery_obs.healthcheck"]' in dockerfile
    # The image's setup jobs and direct Elasticsearch output need the client extra.
    assert 'pip install "/tmp/src[elasticsearch]"' in dockerfile


# ---------------------------------------------------------------- the demo cluster


def demo_facts() -> dict[str, Any]:
    """Import the demo app and load in a child: log_shipping.install() is once per process."""
    script = (
        "import json, demo_app, load\n"
        "print(json.dumps({'queues': demo_app.QUEUES, 'routes': demo_app.app.conf.task_routes,"
        " 'registered': sorted(demo_app.app.tasks), 'sent': sorted(load.TASKS),"
        " 'schedule': sorted(set(load.SCHEDULE))}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(DEMO), "CELERY_OBS_LOG_OUTPUT": "stderr"},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_worker_exporter_and_demo_app_agree_on_queues_and_tasks() -> None:
    facts = demo_facts()
    queues = set(facts["queues"])
    assert {route["queue"] for route in facts["routes"].values()} | {"celery"} == queues
    assert set(command_option("worker", "--queues").split(",")) == queues
    assert set(command_option("exporter", "--queues").split(",")) == queues
    assert facts["schedule"] == facts["sent"]
    assert {f"demo.{kind}" for kind in facts["sent"]} <= set(facts["registered"])
    assert environment("worker")["PYTHONPATH"] == environment("load")["PYTHONPATH"]
    assert environment("worker")["PYTHONPATH"] == "/app/compose/demo"


@pytest.mark.broker
@pytest.mark.slow
def test_demo_cluster_produces_what_the_e2e_check_looks_for(
    redis_url: str, start_exporter: Any, tmp_path: Path
) -> None:
    """The e2e workflow's Prometheus and log conditions, met here without Docker."""
    env = {
        "PYTHONPATH": str(DEMO),
        "CELERY_BROKER_URL": redis_url,
        "CELERY_OBS_LOG_OUTPUT": "stdout",
        "CELERY_OBS_LOG_SPOOL_DIR": str(tmp_path / "spool"),
        "DEMO_TASKS_PER_SECOND": "20",
        "DEMO_HEARTBEAT_FILE": str(tmp_path / "alive"),
    }
    exporter = start_exporter(redis_url)
    worker = Process(
        [
            *(sys.executable, "-m", "celery", "-q", "-A", "demo_app", "worker", "-E"),
            *("-c", "2", "--queues=celery,images,reports", "--without-mingle", "--without-gossip"),
        ],
        env=env,
    )
    load = Process([sys.executable, "-m", "load"], env=env)
    try:
        wait_for(lambda: (tmp_path / "alive").exists(), 30, "the load's heartbeat file")

        def metrics() -> dict[str, float]:
            scrape = exporter.scrape()
            totals = {
                "succeeded": sum(scrape.series("celery_task_succeeded_total", "name").values()),
                "retried": sum(scrape.series("celery_task_retried_total", "name").values()),
                "declined": scrape.series("celery_task_failed_total", "exception").get(
                    ("PaymentDeclined",), 0.0
                ),
                "reports_sent": scrape.series("celery_task_sent_total", "queue_name").get(
                    ("reports",), 0.0
                ),
            }
            return totals if all(totals.values()) else {}

        wait_for(metrics, 60, "succeeded, retried, declined and reports sent", interval=0.5)

        def failure_records() -> list[dict[str, Any]]:
            return [
                r
                for r in json_lines(worker.output())
                if r.get("event", {}).get("action") == "task-failed"
                and r.get("celery", {}).get("task", {}).get("id")
            ]

        failed = wait_for(failure_records, 30, "a task-failed record with celery.task.id")
        assert {r["celery"]["task"]["name"] for r in failed} <= {
            "demo.charge_card",
            "demo.build_report",
        }
    finally:
        load.close()
        worker.close()


# ---------------------------------------------------------------- compose helpers


def json_lines(output: str) -> list[dict[str, Any]]:
    """The JSON objects among a process's output lines (a line still being written is skipped)."""
    records = []
    for line in output.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    return records


def load_module(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec
    assert spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_alert_receiver_prints_one_line_per_alert() -> None:
    port = free_port()
    receiver = Process(
        [sys.executable, str(ROOT / "compose/webhook/alert_receiver.py"), f"--port={port}"]
    )
    try:
        wait_for(lambda: _get(f"http://127.0.0.1:{port}/healthz") == 200, 15, "receiver up")
        payload = {
            "version": "4",
            "status": "firing",
            "receiver": "log-webhook",
            "alerts": [
                {
                    "status": "firing",
                    "labels": {"alertname": "CeleryWorkerDown", "hostname": "w1@h"},
                    "annotations": {"summary": "Celery worker w1@h is down"},
                    "startsAt": "2024-01-01T00:00:00Z",
                },
                {"status": "resolved", "labels": {"alertname": "CeleryQueueBacklogHigh"}},
            ],
        }
        assert _post(f"http://127.0.0.1:{port}/alerts", json.dumps(payload).encode()) == 200
        assert _post(f"http://127.0.0.1:{port}/alerts", b"not json") == 400
        # Both lines are printed before the 200 goes out.
        lines = json_lines(receiver.output())
    finally:
        receiver.close()
    assert [(line["status"], line["alertname"]) for line in lines] == [
        ("firing", "CeleryWorkerDown"),
        ("resolved", "CeleryQueueBacklogHigh"),
    ]
    assert lines[0]["summary"] == "Celery worker w1@h is down"
    assert lines[0]["labels"] == {"alertname": "CeleryWorkerDown", "hostname": "w1@h"}


def _get(url: str) -> int:
    try:
        return http_get(url)[0]
    except OSError:
        return 0


def _post(url: str, body: bytes) -> int:
    request = urllib.request.Request(url, data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


class FakeElasticsearch:
    """Answers the password change with the given statuses in turn, recording each request."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.requests: list[tuple[str, str, str | None, dict[str, Any]]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(
                    (self.command, self.path, self.headers.get("Authorization"), body)
                )
                status = fake.statuses.pop(0)
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_kibana_system_password_step_retries_until_elasticsearch_answers() -> None:
    step = load_module(ROOT / "compose/setup/kibana_system_password.py")
    fake = FakeElasticsearch([503, 200])
    try:
        environ = {
            "ELASTICSEARCH_URL": fake.url + "/",
            "ELASTICSEARCH_USERNAME": "elastic",
            "ELASTICSEARCH_PASSWORD": "pw:1",
            "KIBANA_SYSTEM_PASSWORD": "kibana-pw",
        }
        sleeps: list[float] = []
        assert step.set_password(environ, sleep=sleeps.append) == (
            f"kibana_system password set on {fake.url}"
        )
    finally:
        fake.close()
    assert sleeps == [2.0]
    request = ("POST", "/_security/user/kibana_system/_password", "Basic ZWxhc3RpYzpwdzox")
    assert fake.requests == [(*request, {"password": "kibana-pw"})] * 2


def test_kibana_system_password_step_stops_on_a_refusal() -> None:
    step = load_module(ROOT / "compose/setup/kibana_system_password.py")
    fake = FakeElasticsearch([401])
    try:
        environ = {
            "ELASTICSEARCH_URL": fake.url,
            "ELASTICSEARCH_PASSWORD": "wrong",
            "KIBANA_SYSTEM_PASSWORD": "kibana-pw",
        }
        with pytest.raises(SystemExit, match="refused as elastic: HTTP 401"):
            step.set_password(environ, sleep=lambda _: None)
    finally:
        fake.close()
    assert len(fake.requests) == 1


# ---------------------------------------------------------------- the e2e workflow


def test_e2e_check_compiles_and_checks_what_the_stack_provides() -> None:
    source = (ROOT / "scripts/e2e-check").read_text()
    compile(source, "scripts/e2e-check", "exec")
    assert os.access(ROOT / "scripts/e2e-check", os.X_OK)
    assert source.startswith("#!/usr/bin/env python3\n")
    # Metric names it queries come from the exporter's catalogue.
    queried = set(re.findall(r"\b(celery_\w+)", source)) - {"celery_exporter"}
    assert queried == {
        "celery_task_succeeded_total",
        "celery_task_failed_total",
        "celery_task_retried_total",
        "celery_task_sent_total",
    }
    assert queried <= set(BY_NAME)


def test_e2e_workflow_brings_the_stack_up_checks_and_always_tears_down() -> None:
    workflow = yaml.safe_load((ROOT / ".github/workflows/e2e.yml").read_text())
    steps = workflow["jobs"]["compose"]["steps"]
    runs = [step.get("run", "") for step in steps]
    assert any("cp .env.example .env" in run for run in runs)
    assert "docker compose up -d --build" in runs
    assert "scripts/e2e-check" in runs
    # The README's image size budget is enforced where a Docker engine runs.
    budget = re.search(r"size budget of (\d+) MB", (ROOT / "README.md").read_text())
    assert budget
    assert any(f'test "$size" -le {budget.group(1)}000000' in run for run in runs)
    [teardown] = [step for step in steps if "down -v" in step.get("run", "")]
    assert teardown["if"] == "always()"
    [dump] = [step for step in steps if "docker compose logs" in step.get("run", "")]
    assert dump["if"] == "failure()"
    assert steps.index(teardown) == len(steps) - 1
