"""Generated dashboards: committed JSON is fresh, modern, and built on catalogue metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from celery_obs.cli import main
from celery_obs.dashboards import DASHBOARDS, render
from celery_obs.exporter.metrics import BY_NAME
from celery_obs.rules import alerts as rules
from celery_obs.rules.promql import DEDUP, OVERVIEW_UID, TASK_UID, WORKERS_UID

from support import ROOT, keys_lost

COMMITTED = ROOT / "grafana" / "dashboards"
RULES = ROOT / "prometheus" / "rules"


def load(filename: str) -> dict:
    return json.loads((COMMITTED / filename).read_text())


def all_panels(dashboard: dict) -> list[dict]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def expressions(dashboard: dict) -> list[str]:
    return [t["expr"] for p in all_panels(dashboard) for t in p.get("targets", [])]


@pytest.mark.parametrize("filename", sorted(DASHBOARDS))
def test_committed_json_is_fresh(filename: str) -> None:
    assert (COMMITTED / filename).read_text() == render(DASHBOARDS[filename]), (
        f"grafana/dashboards/{filename} is stale: run `celery-obs dashboards`"
    )


def test_cli_writes_the_same_files(tmp_path: Path, capsys) -> None:
    assert main(["dashboards", "--out", str(tmp_path)], {}) == 0
    for filename in DASHBOARDS:
        assert (tmp_path / filename).read_text() == (COMMITTED / filename).read_text()
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("filename", sorted(DASHBOARDS))
def test_modern_grafana_json(filename: str) -> None:
    dashboard = load(filename)
    assert dashboard["schemaVersion"] >= 36
    assert "rows" not in dashboard
    assert dashboard["uid"] == filename.removesuffix(".json")
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"datasource", "job", "instance", "queue", "task", "kibana_url"} <= set(variables)
    assert variables["datasource"]["type"] == "datasource"
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


@pytest.mark.parametrize("filename", sorted(DASHBOARDS))
def test_grafanas_own_models_parse_every_dashboard_losing_nothing(filename: str) -> None:
    """grafana-foundation-sdk's models are generated from Grafana's schemas (pinned to the
    Grafana the compose stack runs). A key they drop is one Grafana does not know."""
    sdk = pytest.importorskip("grafana_foundation_sdk")
    from grafana_foundation_sdk.cog import plugins
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    grafana_version = compose["services"]["grafana"]["image"].split(":")[1]
    assert sdk.__name__
    assert grafana_version == "11.4.0"  # the SDK release pinned in pyproject
    plugins.register_default_plugins()  # panel options and queries as their typed models
    original = load(filename)
    parsed = json.loads(json.dumps(Dashboard.from_json(original), cls=JSONEncoder))
    assert keys_lost(original, parsed) == []


@pytest.mark.parametrize("filename", sorted(DASHBOARDS))
def test_no_nulls_and_grafanas_own_resolution(filename: str) -> None:
    text = (COMMITTED / filename).read_text()
    assert "null" not in text
    # grafanalib's maxDataPoints 100 and intervalFactor 2 gave ~50 points a panel.
    assert "maxDataPoints" not in text
    assert "intervalFactor" not in text
    for legacy in ("hideControls", "sharedCrosshair", '"style"', '"span"', "tagsQuery", "useTags"):
        assert legacy not in text, legacy


@pytest.mark.parametrize("filename", sorted(DASHBOARDS))
def test_every_panel_says_what_it_shows_and_in_what_unit(filename: str) -> None:
    for panel in all_panels(load(filename)):
        assert panel.get("description"), panel["title"]
        assert panel["fieldConfig"]["defaults"].get("unit"), panel["title"]
    for variable in load(filename)["templating"]["list"]:
        assert variable.get("label") or variable.get("hide") == 2, variable["name"]


def test_the_dashboards_link_to_each_other_with_stable_uids() -> None:
    assert {load(f)["uid"] for f in DASHBOARDS} == {OVERVIEW_UID, TASK_UID, WORKERS_UID}
    for filename in DASHBOARDS:
        dashboard = load(filename)
        assert "celery" in dashboard["tags"]
        [link] = dashboard["links"]
        assert link["type"] == "dashboards"
        assert link["tags"] == ["celery"]
        assert link["keepTime"] is True
        assert link["includeVars"] is True


@pytest.mark.parametrize("filename", sorted(DASHBOARDS))
def test_every_aggregation_counts_exporter_replicas_once(filename: str) -> None:
    """sum/count/topk over raw series would add two HA replicas' copies: each aggregates the
    max over the replica labels instead (recording rules already did)."""
    for expr in expressions(load(filename)):
        raw = re.sub(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\{[^}]*\}", "RULE", expr)
        if re.search(r"\b(sum|count|topk)\b", raw) and "celery_" in raw:
            assert DEDUP in raw, expr


def test_recording_rules_are_filtered_only_on_labels_they_keep() -> None:
    """A matcher on a label a recorded series lacks matches nothing once a value is picked."""
    kept = {}
    for path in RULES.glob("*.yml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "record" in rule:
                    by = re.search(r"by \(([a-z_, ]+?)(?:, le)?\)", rule["expr"])
                    names = re.findall(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", rule["expr"])
                    kept[rule["record"]] = (
                        set(by.group(1).replace(" ", "").split(",")) if by else kept[names[0]]
                    )
    used = 0
    for filename in DASHBOARDS:
        for expr in expressions(load(filename)):
            for rule, matchers in re.findall(r"([a-z_]+:[a-z0-9_]+:[a-z0-9_]+)\{([^}]*)\}", expr):
                labels = set(re.findall(r"([a-z_]+)=~", matchers))
                assert labels <= kept[rule], (filename, rule, labels - kept[rule])
                used += 1
    assert used >= 4


def test_panels_read_the_recording_rules_the_alerts_fire_on() -> None:
    wanted = [
        ("celery-overview.json", "Failure rate", rules.FAILED_RATE),
        ("celery-task.json", "Failure rate", rules.FAILED_RATE),
        ("celery-overview.json", "Workers up", rules.WORKERS_UP),
        ("celery-workers-queues.json", "Queue wait p95", rules.QUEUE_WAIT_P95),
    ]
    for filename, title, rule in wanted:
        [panel] = [p for p in all_panels(load(filename)) if p["title"] == title]
        assert rule in panel["targets"][0]["expr"], (filename, title)
        # Recording rules have no replica labels: the instance filter cannot apply.
        assert "$instance" not in panel["targets"][0]["expr"], (filename, title)


def test_task_drill_down_selects_one_task() -> None:
    task = {v["name"]: v for v in load("celery-task.json")["templating"]["list"]}["task"]
    assert (task["multi"], task["includeAll"]) == (False, False)


def test_failure_panels_link_to_kibana() -> None:
    for filename, title in [
        ("celery-overview.json", "Top failing tasks"),
        ("celery-task.json", "Exceptions"),
        ("celery-task.json", "Failures by exception"),
    ]:
        [panel] = [p for p in load(filename)["panels"] if p["title"] == title]
        [link] = panel["fieldConfig"]["defaults"]["links"]
        assert link["url"].startswith("${kibana_url}/app/discover#/")
        assert 'celery.task.name:\\"${__field.labels.name}\\"' in json.dumps(link["url"])


def test_dashboards_use_only_catalogue_metrics() -> None:
    recorded = {
        r["record"]
        for p in RULES.glob("*.yml")
        for g in yaml.safe_load(p.read_text())["groups"]
        for r in g["rules"]
        if "record" in r
    }
    for filename in DASHBOARDS:
        for expr in expressions(load(filename)):
            rule = re.compile(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\b")
            for name in rule.findall(expr):
                assert name in recorded, (filename, name)
            for name in re.findall(r"\b(celery_[a-z_]+)", rule.sub("", expr)):
                base = re.sub(r"_(bucket|sum|count)$", "", name)
                assert name in BY_NAME or base in BY_NAME, (filename, name)


def test_provisioning_loads_the_dashboards_directory() -> None:
    provider = yaml.safe_load((ROOT / "grafana/provisioning/dashboards/celery.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    source = yaml.safe_load((ROOT / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert source["datasources"][0]["type"] == "prometheus"


LATENCY_PANELS = [
    ("celery-overview.json", "Runtime", "celery_task_runtime_seconds_bucket"),
    ("celery-overview.json", "Queue wait", "celery_task_queue_wait_seconds_bucket"),
    ("celery-overview.json", "End-to-end latency", "celery_task_latency_seconds_bucket"),
    ("celery-task.json", "Runtime by outcome", "celery_task_runtime_seconds_bucket"),
    ("celery-task.json", "Queue wait", "celery_task_queue_wait_seconds_bucket"),
    ("celery-task.json", "End-to-end latency", "celery_task_latency_seconds_bucket"),
]


@pytest.mark.parametrize(("filename", "title", "bucket"), LATENCY_PANELS)
def test_latency_panels_fetch_exemplars_once(filename: str, title: str, bucket: str) -> None:
    [panel] = [p for p in load(filename)["panels"] if p["title"] == title]
    fetching = [t for t in panel["targets"] if t.get("exemplar")]
    assert len(fetching) == 1  # the same exemplars for every quantile: once
    assert bucket in fetching[0]["expr"]
    assert "exemplar" in panel["description"]


def test_only_latency_panels_fetch_exemplars() -> None:
    fetching = {
        (filename, panel["title"])
        for filename in DASHBOARDS
        for panel in all_panels(load(filename))
        for target in panel["targets"]
        if target.get("exemplar")
    }
    assert fetching == {(filename, title) for filename, title, _ in LATENCY_PANELS}


def test_an_exemplar_opens_that_tasks_logs_in_kibana() -> None:
    from celery_obs.dashboards.panels import KIBANA_DATA_VIEW

    source = yaml.safe_load((ROOT / "grafana/provisioning/datasources/prometheus.yml").read_text())
    [destination] = source["datasources"][0]["jsonData"]["exemplarTraceIdDestinations"]
    assert destination["name"] == "task_id"  # the exemplar label the exporter writes
    url = destination["url"]
    # Grafana expands ${VAR} from its environment in provisioning files, and $$ is a literal $.
    assert url.startswith("${CELERY_OBS_KIBANA_URL}/app/discover#/")
    assert f"index:'{KIBANA_DATA_VIEW}'" in url
    assert "query:'celery.task.id:\"$${__value.raw}\"'" in url
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert "CELERY_OBS_KIBANA_URL" in compose["services"]["grafana"]["environment"]
    assert "--enable-feature=exemplar-storage" in compose["services"]["prometheus"]["command"]


def test_the_overview_shows_stuck_and_waiting_work_and_when_each_task_last_ran() -> None:
    panels = load("celery-overview.json")["panels"]
    rows = [p["title"] for p in panels if p["type"] == "row"]
    assert "Stuck and waiting" in rows
    titles = {p["title"]: p for p in panels}
    for title, metric in [
        ("Running now", "celery_task_active"),
        ("Oldest running", "celery_task_oldest_active_age_seconds"),
        ("Waiting on workers", "celery_task_waiting"),
        ("Oldest waiting on a worker", "celery_task_oldest_waiting_age_seconds"),
        ("Tasks lost with their worker", "celery_task_worker_lost_total"),
    ]:
        assert metric in titles[title]["targets"][0]["expr"], title
    table = titles["When each task last ran"]
    assert table["type"] == "table"
    assert [re.search(r"celery_\w+", t["expr"]).group() for t in table["targets"]] == [  # type: ignore[union-attr]
        "celery_task_last_sent_timestamp_seconds",
        "celery_task_last_succeeded_timestamp_seconds",
        "celery_task_last_failed_timestamp_seconds",
    ]
    assert all(t["instant"] for t in table["targets"])
