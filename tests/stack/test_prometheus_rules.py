"""The alert and recording rules: valid, unit-tested with promtool, built on catalogue metrics."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

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
