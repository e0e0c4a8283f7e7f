"""The alert and recording rules: valid, unit-tested with promtool, built on catalogue metrics."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from celery_obs import cli
from celery_obs.exporter.metrics import BY_NAME
from celery_obs.rules import alerts as shipped
from celery_obs.rules import periodic
from celery_obs.rules.promql import OVERVIEW_UID, TASK_UID, WORKERS_UID

from support import ROOT

PROMETHEUS = ROOT / "prometheus"
RULE_FILES = sorted((PROMETHEUS / "rules").glob("*.yml"))
ALERT_TESTS = PROMETHEUS / "tests" / "celery-alerts.test.yml"
RUNBOOKS = ROOT / "docs" / "runbooks.md"
DASHBOARD_UIDS = {OVERVIEW_UID, TASK_UID, WORKERS_UID}

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)"
)


def rules() -> list[dict]:
    return [
        rule
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    ]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=PROMETHEUS)


@needs_promtool
def test_rules_and_config_are_valid() -> None:
    result = promtool("check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def runbook_anchors() -> set[str]:
    """The anchors GitHub makes for docs/runbooks.md's headings."""
    headings = re.findall(r"^#+ (.+)$", RUNBOOKS.read_text(), re.MULTILINE)
    return {re.sub(r"[^a-z0-9 _-]", "", h.lower()).replace(" ", "-") for h in headings}


def check_conventions(rule: dict) -> None:
    """The monitoring-mixin conventions every alert we write follows."""
    name = rule["alert"]
    annotations = rule["annotations"]
    assert set(annotations) == {"summary", "description", "runbook_url", "dashboard_url"}, name
    # The summary is static so notifications group by it; the details go in the description.
    assert "{{" not in annotations["summary"], name
    assert annotations["summary"].endswith("."), name
    # The details: the labels of what fired (an absent() alert has none to tell).
    assert "{{ $labels." in annotations["description"] or "absent(" in rule["expr"], name
    base, _, anchor = annotations["runbook_url"].partition("#")
    assert base.endswith("/docs/runbooks.md"), name
    assert anchor == name.lower(), name
    assert anchor in runbook_anchors(), f"docs/runbooks.md has no section for {name}"
    uid = re.fullmatch(r"http://localhost:3000/d/([a-z-]+)(\?.*)?", annotations["dashboard_url"])
    assert uid, annotations["dashboard_url"]
    assert uid.group(1) in DASHBOARD_UIDS, annotations["dashboard_url"]
    assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name


def test_every_alert_has_a_firing_case_and_follows_the_conventions() -> None:
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    firing = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    quiet = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if not case.get("exp_alerts")
    }
    alerts = [rule for rule in rules() if "alert" in rule]
    assert len(alerts) == 15
    for rule in alerts:
        assert rule["alert"] in firing, f"{rule['alert']} has no promtool case that fires"
        check_conventions(rule)
    assert {
        "CeleryWorkerDown",  # a warm shutdown (scale-in, deploy) stays quiet
        "CeleryExporterDown",  # one replica of two down stays quiet
        "CeleryExporterAbsent",
        "CeleryTaskFailureRateHigh",
        "CeleryTaskEventsMissing",
    } <= quiet


def test_recording_rules_are_named_for_the_labels_they_keep() -> None:
    recorded = [rule for rule in rules() if "record" in rule]
    assert len(recorded) == 12
    for rule in recorded:
        level = rule["record"].split(":")[0]
        by = re.search(r"^sum by \(([a-z_, ]+)\)", rule["expr"]) or re.search(
            r"histogram_quantile\(0\.95, sum by \(([a-z_, ]+), le\)", rule["expr"]
        )
        if by:
            kept = [label for label in by.group(1).replace(" ", "").split(",")]
            # Every rule keeps the labels that tell clusters apart; names list the rest.
            assert kept[:3] == ["cluster", "namespace", "job"], rule["record"]
            assert "_".join(kept[2:]) == level, rule["record"]
        else:  # built from other recording rules, at the same level
            used = re.findall(r"([a-z_]+):[a-z0-9_]+:[a-z0-9_]+", rule["expr"])
            assert used, rule["record"]
            assert set(used) == {level}, rule["record"]
        # Replicas are deduplicated before anything is summed (or built on rules that are).
        raw = re.sub(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", "", rule["expr"])
        assert "max without (instance, pod)" in rule["expr"] or "celery_" not in raw, rule["record"]


def test_the_committed_rules_are_what_the_generator_writes(tmp_path, capsys) -> None:
    assert cli.main(["rules", "alerts", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"wrote {tmp_path / name}" for name in ("celery-recording.yml", "celery-alerts.yml")
    ]
    for path in RULE_FILES:
        assert (tmp_path / path.name).read_text() == path.read_text(), (
            f"{path.name} is stale: run celery-obs rules alerts --out prometheus/rules"
        )
    assert set(shipped.rule_files()) == {path.name for path in RULE_FILES}


#: Under the Prometheus Operator the job label is the Service's name, and every target has a
#: namespace, service and pod. A PromQL set of inputs shaped like that.
OPERATOR_SERIES = 'namespace="celery",service="exporter",job="exporter",pod="exporter-0"'


def operator_tests(rule_files: list[str]) -> dict:
    return {
        "rule_files": rule_files,
        "evaluation_interval": "1m",
        "tests": [
            {
                "name": "an operator-scraped exporter that is up",
                "interval": "1m",
                "input_series": [
                    {
                        "series": f'up{{{OPERATOR_SERIES},instance="10.0.0.5:9808"}}',
                        "values": "1x15",
                    }
                ],
                "alert_rule_test": [
                    {"eval_time": "10m", "alertname": "CeleryExporterAbsent", "exp_alerts": []},
                    {"eval_time": "10m", "alertname": "CeleryExporterDown", "exp_alerts": []},
                ],
            },
            {
                "name": "an operator-scraped exporter that is down",
                "interval": "1m",
                "input_series": [
                    {
                        "series": f'up{{{OPERATOR_SERIES},instance="10.0.0.5:9808"}}',
                        "values": "0x15",
                    }
                ],
                "alert_rule_test": [
                    {"eval_time": "10m", "alertname": "CeleryExporterAbsent", "exp_alerts": []},
                    {
                        "eval_time": "10m",
                        "alertname": "CeleryExporterDown",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "critical",
                                    "job": "exporter",
                                    "namespace": "celery",
                                    "service": "exporter",
                                },
                                "exp_annotations": {
                                    "summary": "No Celery exporter replica can be scraped.",
                                    "description": "Prometheus has failed to scrape every "
                                    "replica of exporter for 2 minutes: no Celery metric is "
                                    "fresh and every other Celery alert is blind.",
                                    "runbook_url": "https://runbooks.example/celery.md"
                                    "#celeryexporterdown",
                                    "dashboard_url": "https://grafana.example/d/celery-overview"
                                    "?var-job=exporter",
                                },
                            }
                        ],
                    },
                ],
            },
        ],
    }


@needs_promtool
def test_a_custom_selector_watches_an_operator_scraped_exporter(tmp_path, capsys) -> None:
    selector = 'namespace="celery",service="exporter"'
    argv = ["rules", "alerts", "--selector", selector, "--out", str(tmp_path / "custom")]
    argv += ["--runbook-url", "https://runbooks.example/celery.md"]
    argv += ["--grafana-url", "https://grafana.example/"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    custom = sorted(map(str, (tmp_path / "custom").glob("*.yml")))
    assert (
        'namespace="celery", service="exporter"'
        in (tmp_path / "custom" / "celery-alerts.yml").read_text()
    )
    assert promtool("check", "rules", *custom).returncode == 0
    tests = tmp_path / "custom.test.yml"
    tests.write_text(yaml.safe_dump(operator_tests(custom)))
    result = promtool("test", "rules", str(tests))
    assert result.returncode == 0, result.stdout + result.stderr

    # The shipped default selector is what the issue measured: Absent forever, Down never.
    tests.write_text(yaml.safe_dump(operator_tests([str(path) for path in RULE_FILES])))
    result = promtool("test", "rules", str(tests))
    assert result.returncode == 1
    assert "alertname: CeleryExporterAbsent" in result.stdout + result.stderr
    assert "alertname: CeleryExporterDown" in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("argv", "status", "message"),
    [
        (["--selector", "job=celery"], 2, "is not a list of label matchers"),
        (["--selector", 'name="x"'], 2, "the rules set 'name' themselves"),
        (["--selector", 'job=~"("'], 2, "is not a regular expression"),
        (["--selector", 'job="a{{b}}"'], 2, "cannot go into alert rules"),
        (["--selector", "job='x'"], 2, "values in double quotes"),
    ],
)
def test_bad_alert_selectors_are_usage_errors(argv, status, message, tmp_path, capsys) -> None:
    assert cli.main(["rules", "alerts", *argv, "--out", str(tmp_path)]) == status
    captured = capsys.readouterr()
    assert captured.out == ""
    assert message in captured.err
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_rules_directory_is_a_clear_error(tmp_path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main(["rules", "alerts", "--out", str(blocker / "rules")]) == 1
    assert f"cannot create {blocker / 'rules'}: Not a directory" in capsys.readouterr().err


def test_rules_use_only_catalogue_metrics() -> None:
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    recording = re.compile(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\b")
    for rule in rules():
        where = rule.get("alert") or rule.get("record")
        for name in recording.findall(rule["expr"]):
            assert name in recorded, f"recording rule {name} used by {where} is not defined"
        for name in re.findall(r"\b(celery_[a-z_]+)", recording.sub("", rule["expr"])):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert name in BY_NAME or base in BY_NAME, f"{name} in {where} is not in the catalogue"


# -- generated dead-man's switches for periodic tasks ----------------------------------------------

PERIODIC_EXAMPLE = PROMETHEUS / "examples" / "celery-periodic.yml"
PERIODIC_TESTS = PROMETHEUS / "tests" / "celery-periodic.test.yml"
PERIODIC_ARGS = [
    "reports.nightly=26h",
    "billing.sync=20m",
    "--selector",
    'job="celery-exporter"',
]


def test_the_periodic_example_is_what_the_generator_writes(tmp_path) -> None:
    out = tmp_path / "periodic.yml"
    assert cli.main(["rules", "periodic", *PERIODIC_ARGS, "--out", str(out)]) == 0
    assert out.read_text() == PERIODIC_EXAMPLE.read_text(), (
        "regenerate: celery-obs rules periodic "
        + " ".join(PERIODIC_ARGS[:2])
        + " --selector 'job=\"celery-exporter\"' --out prometheus/examples/celery-periodic.yml"
    )


@needs_promtool
def test_periodic_rules_pass_promtool_lint_and_their_unit_tests() -> None:
    result = promtool("check", "rules", str(PERIODIC_EXAMPLE))
    assert result.returncode == 0, result.stdout + result.stderr
    result = promtool("test", "rules", str(PERIODIC_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    cases = yaml.safe_load(PERIODIC_TESTS.read_text())["tests"]
    firing = {
        case["alertname"]
        for test in cases
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    generated = yaml.safe_load(PERIODIC_EXAMPLE.read_text())["groups"][0]["rules"]
    assert {rule["alert"] for rule in generated} == firing


@needs_promtool
def test_task_names_and_selectors_that_need_quoting_make_valid_rules(tmp_path) -> None:
    tasks = [
        periodic.parse_periodic('app.weird"name\\with=equals=5m'),
        periodic.parse_periodic("  spaced.out = 1d12h "),
        periodic.parse_periodic("exact=12d1s"),
        periodic.parse_periodic("quick=1m500ms"),
    ]
    assert (tasks[0].name, tasks[0].seconds) == ('app.weird"name\\with=equals', 300)
    assert (tasks[1].name, tasks[1].every, tasks[1].seconds) == ("spaced.out", "1d12h", 129600)
    text = periodic.periodic_rules(tasks, '{env=~"prod|stage", job!="x",}', "critical")
    path = tmp_path / "rules.yml"
    path.write_text(text)
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    rules = yaml.safe_load(text)["groups"][0]["rules"]
    assert [rule["labels"] for rule in rules][:4] == [
        {"severity": "critical", "name": 'app.weird"name\\with=equals'},
        {"severity": "critical", "name": 'app.weird"name\\with=equals'},
        {"severity": "critical", "name": "spaced.out"},
        {"severity": "critical", "name": "spaced.out"},
    ]
    assert 'name="app.weird\\"name\\\\with=equals", env=~"prod|stage", job!="x"' in text
    assert "[12d1s])) > 1036801\n" in text  # to the second, not rounded
    assert "[1m500ms])) > 60.5\n" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["nightly"], "expected TASK_NAME=DURATION"),
        (["=5m"], "expected TASK_NAME=DURATION"),
        (["nightly=5"], "'5' is not a Prometheus duration"),
        (["nightly=1.5h"], "'1.5h' is not a Prometheus duration"),
        (["nightly=0m"], "'0m' is not a positive duration"),
        (["a=5m", "b=1h", "a=2h"], "a task is given twice: a"),
        (["nightly=30m1h"], "'30m1h' is not a Prometheus duration"),  # largest unit first
        (["nightly=1h1h"], "'1h1h' is not a Prometheus duration"),  # each unit once
        (["nightly=99999999999999999999y"], "is longer than ten years"),
        (["bad{{name=1h"], "cannot be an alert label"),  # alert labels are templates
        (["a=5m", "--selector", "job=celery"], "is not a list of label matchers"),
        (["a=5m", "--selector", 'job="x"} or vector(1) {'], "is not a list of label matchers"),
        (["a=5m", "--selector", 'jöb="x"'], "is not a list of label matchers"),
        (["a=5m", "--selector", 'job="\\q"'], "is not a list of label matchers"),
        (["a=5m", "--selector", '__name__="x"'], "the rules set '__name__' themselves"),
        (["a=5m", "--selector", 'name="x"'], "the rules set 'name' themselves"),
        (["a=5m", "--selector", 'job=~"("'], "is not a regular expression"),
        (["# only a comment", ""], "no tasks given"),
    ],
)
def test_bad_periodic_specs_are_usage_errors_that_say_why(argv, message, capsys) -> None:
    assert cli.main(["rules", "periodic", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("celery-obs rules: ")
    assert message in captured.err


def test_periodic_tasks_can_come_from_a_file(tmp_path, capsys) -> None:
    listing = tmp_path / "periodic.txt"
    listing.write_text("# nightly reports\nreports.nightly=26h\n\nbilling.sync=20m\n")
    argv = ["rules", "periodic", f"@{listing}", "--selector", 'job="celery-exporter"']
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == PERIODIC_EXAMPLE.read_text()


def test_an_unwritable_output_is_a_clear_error(tmp_path, capsys) -> None:
    out = tmp_path / "missing-dir" / "rules.yml"
    assert cli.main(["rules", "periodic", "a=5m", "--out", str(out)]) == 1
    assert f"cannot write {out}: No such file or directory" in capsys.readouterr().err
