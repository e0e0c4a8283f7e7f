"""Proven live: a real Prometheus scrapes the exporter watching real workers on Redis, loads our
rules (alert durations shortened for the test), and every recording rule and dashboard panel
returns data; a SIGKILLed worker drives CeleryWorkerDown to firing, a warm shutdown never even
makes it pending; Prometheus negotiates OpenMetrics and stores the exemplars, whose task ids are
the real ids of the tasks the test sent."""

from __future__ import annotations

import json
import re
import shutil
import signal
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from support import ROOT, Process, free_port, http_get, producer, wait_for

pytestmark = [
    pytest.mark.broker,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs Debian's prometheus"),
]

RULES = ROOT / "prometheus" / "rules"
DASHBOARDS = ROOT / "grafana" / "dashboards"
#: Grafana variables as a user who picked "All" would have them.
VARIABLES = {
    "$__rate_interval": "1m",
    "$__range": "5m",
    "$job": ".*",
    "$instance": ".*",
    "$queue": ".*",
    "$task": ".*",
}


class Prometheus:
    def __init__(self, target: str, workdir: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        rule_files = []
        for path in sorted(RULES.glob("*.yml")):
            # Same rules, shorter `for:` so the test sees alerts fire in seconds.
            text = re.sub(r"(\n\s+for: )\d+m", r"\g<1>3s", path.read_text())
            (workdir / path.name).write_text(text)
            rule_files.append(path.name)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": rule_files,
            "scrape_configs": [
                {"job_name": "celery-exporter", "static_configs": [{"targets": [target]}]}
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.process = Process(
            [
                shutil.which("prometheus") or "prometheus",
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--enable-feature=exemplar-storage",
            ],
        )
        wait_for(lambda: self._ready(), 30, "Prometheus ready")

    def _ready(self) -> bool:
        try:
            return http_get(f"{self.base}/-/ready")[0] == 200
        except OSError:
            return False

    def api(self, path: str, **params: str) -> dict:
        status, body = http_get(f"{self.base}/api/v1/{path}?{urllib.parse.urlencode(params)}")
        data = json.loads(body)
        assert status == 200, body
        assert data["status"] == "success", body
        return data["data"]

    def query(self, expr: str) -> list:
        return self.api("query", query=expr)["result"]

    def query_range(self, expr: str, seconds: float = 300) -> list:
        """As a Grafana time series panel asks: the last `seconds`, a point per second."""
        end = time.time()
        return self.api(
            "query_range", query=expr, start=str(end - seconds), end=str(end), step="1"
        )["result"]

    def exemplars(self, expr: str, seconds: float = 300) -> list[dict]:
        end = time.time()
        result = self.api("query_exemplars", query=expr, start=str(end - seconds), end=str(end))
        return [exemplar for series in result for exemplar in series["exemplars"]]

    def close(self) -> None:
        self.process.close()


@pytest.fixture
def prometheus_for() -> Iterator:
    started: list[Prometheus] = []
    workdir = Path(tempfile.mkdtemp(prefix="celery-obs-prometheus-"))

    def start(target: str) -> Prometheus:
        prometheus = Prometheus(target, workdir)
        started.append(prometheus)
        return prometheus

    yield start
    for prometheus in started:
        prometheus.close()
    shutil.rmtree(workdir, ignore_errors=True)


def recording_rules() -> list[dict]:
    return [
        rule
        for path in sorted(RULES.glob("*.yml"))
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "record" in rule
    ]


def dashboard_queries() -> list[tuple[str, str, str, bool]]:
    """(dashboard, panel title, expression with variables substituted, instant?) for every
    target: tables ask for one instant, time series for a range."""
    queries = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"]
                for variable, value in VARIABLES.items():
                    expr = expr.replace(variable, value)
                assert "$" not in expr, expr
                queries.append((path.name, panel["title"], expr, bool(target.get("instant"))))
    return queries


def test_rules_and_dashboards_return_data_and_a_killed_worker_fires(
    redis_url, queue, start_exporter, start_worker, prometheus_for, tmp_path
):
    exporter = start_exporter(redis_url, "--worker-timeout", "3")
    worker = start_worker(redis_url, queue)
    scaled_in = start_worker(redis_url, queue, "scaled-in")
    exporter.wait_value("celery_worker_up", 1, hostname=worker.hostname)
    exporter.wait_value("celery_worker_up", 1, hostname=scaled_in.hostname)
    prometheus = prometheus_for(f"127.0.0.1:{exporter.port}")

    wait_for(lambda: prometheus.query('up{job="celery-exporter"} == 1'), 30, "a first scrape")

    # rate() needs a counter to rise between scrapes: send in two rounds, the second after
    # Prometheus has seen the first.
    app = producer(redis_url, queue)
    sent_ids: set[str] = set()
    send = app.send_task

    def send_task(*args, **kwargs):
        result = send(*args, **kwargs)
        sent_ids.add(result.id)
        return result

    app.send_task = send_task  # type: ignore[method-assign]
    fail = {"name": "obs.fail_value", "queue_name": queue, "exception": "ValueError"}
    for round_, (adds, fails) in enumerate([(10, 4), (20, 6)]):
        for i in range(adds):
            app.send_task("obs.add", (i, i))
        for _ in range(fails):
            app.send_task("obs.fail_value")
        # Retries, rejections and a revoked countdown task feed the remaining panels.
        app.send_task("obs.retry_once")
        app.send_task("obs.reject")
        eta = app.send_task("obs.add", (0, 0), countdown=2)
        exporter.wait_value(
            "celery_task_received_total",
            11 if round_ == 0 else 32,
            name="obs.add",
            queue_name=queue,
        )
        app.control.revoke(eta.id)
        total = 4 if round_ == 0 else 10
        selector = ",".join(f'{k}="{v}"' for k, v in fail.items())
        wait_for(
            lambda total=total, selector=selector: prometheus.query(
                f"celery_task_failed_total{{{selector}}} == {total}"
            ),
            60,
            f"{total} failures scraped",
        )

    # Every recording rule's expression returns data once Prometheus has a few scrapes.
    for rule in recording_rules():
        result = wait_for(
            lambda rule=rule: prometheus.query(rule["expr"]), 60, f"data for {rule['record']}"
        )
        assert all(float(sample["value"][1]) == float(sample["value"][1]) for sample in result)

    ratio = prometheus.query(
        f'job_name_queue_name:celery_task_failure:ratio5m{{name="obs.fail_value",queue_name="{queue}"}}'
    )
    assert [float(s["value"][1]) for s in ratio] == [1.0]

    # A scale-in: the worker shuts down warmly (worker-offline) and is down, not lost.
    scaled_in.signal(signal.SIGTERM)
    assert scaled_in.wait(20) == 0
    graceful = f'hostname="{scaled_in.hostname}"'
    wait_for(
        lambda: prometheus.query(f"celery_worker_up{{{graceful}}} == 0"),
        30,
        "the scaled-in worker scraped as down",
    )
    assert prometheus.query(f"celery_worker_lost{{{graceful}}} == 0")

    # Four tasks that run until released: the worker's two processes run two, two wait
    # prefetched. The stuck-and-waiting panels see them; then the worker is killed with them.
    release = tmp_path / "release"
    for _ in range(4):
        app.send_task("obs.wait_for", (str(release),))
    task = f'name="obs.wait_for",queue_name="{queue}"'
    wait_for(
        lambda: (
            prometheus.query(f"celery_task_active{{{task}}} == 2")
            and prometheus.query(f"celery_task_waiting{{{task}}} == 2")
        ),
        30,
        "two tasks running and two waiting, scraped",
    )
    wait_for(
        lambda: prometheus.query(f"celery_task_oldest_active_age_seconds{{{task}}} > 2"),
        30,
        "the running tasks' age growing",
    )

    worker.signal(signal.SIGKILL)

    def firing() -> bool:
        alerts = prometheus.api("alerts")["alerts"]
        return any(
            a["labels"]["alertname"] == "CeleryWorkerDown"
            and a["labels"].get("hostname") == worker.hostname
            and a["state"] == "firing"
            for a in alerts
        )

    wait_for(firing, 60, "CeleryWorkerDown firing for the killed worker", interval=0.5)
    # The scaled-in worker has been down longer than the killed one: had the alert looked at
    # celery_worker_up, it would have fired for it first. ALERTS keeps every pending state.
    assert prometheus.query(f'ALERTS{{alertname="CeleryWorkerDown",{graceful}}}') == []
    assert (
        prometheus.query(f'max_over_time(ALERTS{{alertname="CeleryWorkerDown",{graceful}}}[10m])')
        == []
    )

    # The killed worker's four tasks stop running and waiting, and are counted as lost.
    wait_for(
        lambda: (
            prometheus.query(f"celery_task_worker_lost_total{{{task}}} == 4")
            and prometheus.query(f"celery_task_active{{{task}}} == 0")
            and prometheus.query(f"celery_task_waiting{{{task}}} == 0")
        ),
        30,
        "the lost worker's tasks counted and gone",
    )

    # Every target of every dashboard panel returns data, asked as Grafana asks: tables for
    # now, time series over the last minutes (the stuck tasks ran then).
    for dashboard, title, expr, instant in dashboard_queries():
        ask = prometheus.query if instant else prometheus.query_range
        wait_for(lambda expr=expr, ask=ask: ask(expr), 30, f"data for {dashboard}: {title}")

    # Prometheus scraped OpenMetrics and kept the exemplars: real ids of the tasks sent.
    assert prometheus.query('scrape_samples_scraped{job="celery-exporter"} > 0')
    for histogram in ("runtime", "queue_wait", "latency"):
        exemplars = wait_for(
            lambda histogram=histogram: prometheus.exemplars(
                f'celery_task_{histogram}_seconds_bucket{{queue_name="{queue}"}}'
            ),
            30,
            f"exemplars of celery_task_{histogram}_seconds",
        )
        ids = {exemplar["labels"]["task_id"] for exemplar in exemplars}
        assert ids <= sent_ids, ids - sent_ids
        assert all(set(exemplar["labels"]) == {"task_id"} for exemplar in exemplars)
