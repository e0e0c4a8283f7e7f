"""Proven live: a real Prometheus scrapes two exporter replicas (high availability, as the README
recommends) watching real workers on Redis, loads our rules (alert durations shortened for the
test), and every recording rule and dashboard panel returns data, the same with "All" instances
as with one replica; a SIGKILLed worker drives CeleryWorkerDown to firing once, a warm shutdown
never even makes it pending; Prometheus negotiates OpenMetrics and stores the exemplars, whose
task ids are the real ids of the tasks the test sent."""

from __future__ import annotations

import json
import math
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
    def __init__(
        self, targets: list[str], workdir: Path, features: str = "exemplar-storage"
    ) -> None:
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
                {"job_name": "celery-exporter", "static_configs": [{"targets": targets}]}
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.process = Process(
            [
                shutil.which("prometheus") or "prometheus",
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                f"--enable-feature={features}",
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

    def query(self, expr: str, at: float | None = None) -> list:
        params = {"query": expr} if at is None else {"query": expr, "time": str(at)}
        return self.api("query", **params)["result"]

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

    def start(targets: list[str], **options: str) -> Prometheus:
        prometheus = Prometheus(targets, workdir, **options)
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


def dashboard_queries(**chosen: str) -> list[tuple[str, str, str, bool]]:
    """(dashboard, panel title, expression with variables substituted, instant?) for every
    target: tables ask for one instant, time series for a range. `chosen` overrides variables
    (`instance="host:port"`)."""
    variables = {**VARIABLES, **{f"${name}": value for name, value in chosen.items()}}
    queries = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"]
                for variable, value in variables.items():
                    expr = expr.replace(variable, value)
                assert "$" not in expr, expr
                queries.append((path.name, panel["title"], expr, bool(target.get("instant"))))
    return queries


def values(result: list) -> dict[str, float]:
    """An instant query's samples by their label set."""
    return {json.dumps(s["metric"], sort_keys=True): float(s["value"][1]) for s in result}


def assert_replicas_counted_once(prometheus: Prometheus, first: str, second: str) -> None:
    """ "All" instances counts the cluster once: every panel, at one instant, shows what one
    replica alone shows. The replicas' own numbers differ a little where a counter is seconds
    old (Prometheus extrapolates a rate by when each target was scraped), so "All" must lie
    between them: double counting gives their sum, about twice either."""
    at = time.time() - 2  # both replicas scraped by then
    every = dashboard_queries(__rate_interval="5m")
    each = [
        dashboard_queries(__rate_interval="5m", instance=re.escape(target).replace("\\", "\\\\"))
        for target in (first, second)
    ]
    compared = 0
    for (dashboard, title, expr, _), *alone in zip(every, *each, strict=True):
        both = values(prometheus.query(expr, at))
        one, other = (values(prometheus.query(q[2], at)) for q in alone)
        where = f"{dashboard}: {title}: {expr}"
        assert both.keys() == one.keys() | other.keys(), where
        for series, value in both.items():
            seen = [v for v in (one.get(series), other.get(series)) if v is not None]
            if all(math.isnan(v) for v in seen):  # a quantile of nothing
                assert math.isnan(value), (where, series, value)
                continue
            numbers = [v for v in seen if not math.isnan(v)]
            low, high = min(numbers), max(numbers)
            if "time()" in expr:  # an age: the replicas were scraped up to a second apart
                assert low - 2.5 <= value <= high + 2.5, (where, series, value, low, high)
            else:  # double counting would give about twice `high`
                assert 0.75 * low <= value <= 1.25 * high + 1e-9, (where, series, value, one, other)
            compared += 1
    assert compared > 50


def test_rules_and_dashboards_return_data_and_a_killed_worker_fires(
    redis_url, queue, start_exporter, start_worker, prometheus_for, tmp_path
):
    # Two replicas on one broker, as the README recommends for high availability.
    exporter = start_exporter(redis_url, "--worker-timeout", "3")
    replica = start_exporter(redis_url, "--worker-timeout", "3")
    worker = start_worker(redis_url, queue)
    scaled_in = start_worker(redis_url, queue, "scaled-in")
    for each in (exporter, replica):
        each.wait_value("celery_worker_up", 1, hostname=worker.hostname)
        each.wait_value("celery_worker_up", 1, hostname=scaled_in.hostname)
    first, second = f"127.0.0.1:{exporter.port}", f"127.0.0.1:{replica.port}"

    # rate() needs a counter to rise between scrapes: send in two rounds, the second after
    # Prometheus has seen the first. It starts scraping after the first round: each replica's
    # series then start from the same values (a series' first value is not in its rate), so
    # the replicas' panels can be compared.
    app = producer(redis_url, queue)
    sent_ids: set[str] = set()
    send = app.send_task

    def send_task(*args, **kwargs):
        result = send(*args, **kwargs)
        sent_ids.add(result.id)
        return result

    app.send_task = send_task  # type: ignore[method-assign]
    fail = {"name": "obs.fail_value", "queue_name": queue, "exception": "ValueError"}
    failed = "celery_task_failed_total{" + ",".join(f'{k}="{v}"' for k, v in fail.items()) + "}"

    def send_round(adds: int, fails: int, received: int) -> None:
        for i in range(adds):
            app.send_task("obs.add", (i, i))
        for _ in range(fails):
            app.send_task("obs.fail_value")
        # Retries, rejections and a revoked countdown task feed the remaining panels.
        app.send_task("obs.retry_once")
        app.send_task("obs.reject")
        eta = app.send_task("obs.add", (0, 0), countdown=2)
        exporter.wait_value(
            "celery_task_received_total", received, name="obs.add", queue_name=queue
        )
        app.control.revoke(eta.id)

    send_round(10, 4, received=11)
    for each in (exporter, replica):
        each.wait_value("celery_task_failed_total", 4, **fail)
    prometheus = prometheus_for([first, second])
    wait_for(lambda: prometheus.query("count(up == 1) == 2"), 30, "first scrapes")
    wait_for(lambda: prometheus.query(f"{failed} == 4"), 60, "4 failures scraped")
    send_round(20, 6, received=32)
    wait_for(lambda: prometheus.query(f"{failed} == 10"), 60, "10 failures scraped")

    # Every recording rule's expression returns numbers once Prometheus has a few scrapes.
    # (A quantile is NaN until a rate sees the second round rise: for a scrape or two, not
    # for the minute a broken rule would stay NaN.)
    def numbers(expr: str) -> list:
        result = prometheus.query(expr)
        return result if all(not math.isnan(float(s["value"][1])) for s in result) else []

    for rule in recording_rules():
        wait_for(lambda rule=rule: numbers(rule["expr"]), 60, f"numbers for {rule['record']}")

    ratio = prometheus.query(
        f'job_name_queue_name:celery_task_failure:ratio5m{{name="obs.fail_value",queue_name="{queue}"}}'
    )
    assert [float(s["value"][1]) for s in ratio] == [1.0]  # one series, not one per replica
    workers_up = prometheus.query('job:celery_workers_up:sum{job="celery-exporter"}')
    assert [float(s["value"][1]) for s in workers_up] == [2.0]  # two workers, not four

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
    # Once, though two replicas saw it: the alert takes the max over the replica labels.
    [down] = [
        a
        for a in prometheus.api("alerts")["alerts"]
        if a["labels"]["alertname"] == "CeleryWorkerDown"
    ]
    assert "instance" not in down["labels"]
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

    assert_replicas_counted_once(prometheus, first, second)

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


def send_lifecycles(broker_url: str, queue: str, runtimes: list[float]) -> None:
    """Each runtime as one task's lifecycle, sent by Celery's own event dispatcher."""
    from celery import Celery

    app = Celery("obs_native", broker=broker_url, set_as_current=False)
    try:
        with app.connection_for_write() as connection:
            dispatcher = app.events.Dispatcher(connection, hostname="native@host")
            start = time.time() - 600
            for number, runtime in enumerate(runtimes):
                task = {"uuid": f"native-{number}", "name": "obs.native", "retries": 0}
                at = start + number
                dispatcher.send("task-sent", **task, queue=queue, timestamp=at)
                dispatcher.send("task-received", **task, timestamp=at)
                dispatcher.send("task-started", **task, timestamp=at + 0.5)
                dispatcher.send(
                    "task-succeeded", **task, runtime=runtime, timestamp=at + 0.5 + runtime
                )
            dispatcher.close()
    finally:
        app.close()


def classic_bucket_of(text: str, series: str, rank: float) -> tuple[float, float]:
    """The classic bucket (lower, upper bound) in which the observation of `rank` lies."""
    buckets = sorted(
        (float(le), float(count))
        for le, count in re.findall(series + r',le="([^"]+)"} (\S+)', text)
    )
    lower = 0.0
    for upper, cumulative in buckets:
        if cumulative >= rank:
            return lower, upper
        lower = upper
    raise AssertionError("rank past the +Inf bucket")


def test_native_histograms_agree_with_the_classic_buckets_within_their_resolution(
    redis_url, queue, start_exporter, prometheus_for
):
    """Prometheus with native histograms asks for the protobuf exposition and stores the three
    duration histograms as native ones: their quantiles agree with the classic buckets (each
    lies in the classic bucket that holds it) and with the true values within one native
    bucket (9 %), and their count and sum are exact."""
    import random

    exporter = start_exporter(redis_url)
    # Runtimes log-uniform over 1 ms .. 100 s, as a mixed cluster's tasks are.
    generator = random.Random(17)
    runtimes = [round(10 ** generator.uniform(-3, 2), 6) for _ in range(400)]
    send_lifecycles(redis_url, queue, runtimes)
    labels = {"name": "obs.native", "queue_name": queue, "outcome": "succeeded"}
    exporter.wait_value("celery_task_runtime_seconds_count", len(runtimes), **labels)
    prometheus = prometheus_for([f"127.0.0.1:{exporter.port}"], features="native-histograms")
    selector = 'celery_task_runtime_seconds{name="obs.native",outcome="succeeded"}'
    wait_for(
        lambda: prometheus.query(f"histogram_count({selector}) == {len(runtimes)}"),
        30,
        "the native runtime histogram scraped",
    )
    [sample] = prometheus.query(selector)
    assert "histogram" in sample, "stored as a native histogram"
    assert prometheus.query(f"{selector.replace('seconds', 'seconds_bucket')}") == []
    [total] = values(prometheus.query(f"histogram_sum({selector})")).values()
    assert total == pytest.approx(sum(runtimes), rel=1e-9)
    for histogram in ("queue_wait", "latency"):
        native = f'celery_task_{histogram}_seconds{{name="obs.native"}}'
        counts = values(prometheus.query(f"histogram_count({native})"))
        assert list(counts.values()) == [len(runtimes)], histogram

    text = exporter.scrape().text
    series = (
        'celery_task_runtime_seconds_bucket{name="obs.native",'
        f'queue_name="{queue}",outcome="succeeded"'
    )
    ordered = sorted(runtimes)
    growth = 2 ** (2**-3)  # one native bucket at schema 3
    for q in (0.1, 0.5, 0.9, 0.99):
        [estimate] = values(prometheus.query(f"histogram_quantile({q}, {selector})")).values()
        lower, upper = classic_bucket_of(text, series, q * len(runtimes))
        assert lower <= estimate <= upper, (q, estimate, lower, upper)
        true = ordered[math.ceil(q * len(runtimes)) - 1]
        assert true / growth <= estimate <= true * growth, (q, estimate, true)
