"""The alert and recording rules: valid, unit-tested with promtool, built on catalogue metrics."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from celery_obs import cli
from celery_obs import rules as periodic
from celery_obs.exporter.metrics import BY_NAME

from support import ROOT

PROMETHEUS = ROOT / "prometheus"
RULE_FILES = sorted((PROMETHEUS / "rules").glob("*.yml"))
ALERT_TESTS = PROMETHEUS / "tests" / "celery-alerts.test.yml"

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


def test_every_alert_has_a_firing_case_and_its_annotations() -> None:
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    firing = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    alerts = [rule for rule in rules() if "alert" in rule]
    assert len(alerts) >= 10
    for rule in alerts:
        assert rule["alert"] in firing, f"{rule['alert']} has no promtool case that fires"
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}


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
