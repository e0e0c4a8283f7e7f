"""The docs list every metric of the catalogue (docs/metrics.md), and the README every flag of the
exporter and every log_shipping setting."""

from __future__ import annotations

import re
from pathlib import Path

from celery_obs.cli import build_parser
from celery_obs.exporter.metrics import CATALOGUE
from celery_obs.log_shipping.hooks import NAMES as LOG_SETTING_NAMES

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
METRICS_DOC = (ROOT / "docs" / "metrics.md").read_text()


def table(marker: str, text: str = README) -> list[list[str]]:
    block = text.split(f"<!-- {marker}:start -->")[1].split(f"<!-- {marker}:end -->")[0]
    rows = [line for line in block.strip().splitlines()[2:] if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def test_metric_table_equals_the_catalogue() -> None:
    documented = {
        (name.strip("`"), kind, tuple(re.findall(r"`(\w+)`", labels)))
        for name, kind, labels, _meaning in table("metrics", METRICS_DOC)
    }
    assert documented == {(spec.name, spec.type, spec.labels) for spec in CATALOGUE}


def test_flag_table_lists_every_exporter_flag() -> None:
    parser = build_parser({})
    exporter = parser._subparsers._group_actions[0].choices["exporter"]  # type: ignore[union-attr]
    flags = {
        option
        for action in exporter._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }
    documented = {flag for row in table("flags") for flag in re.findall(r"`(--[\w.-]+)`", row[0])}
    assert documented == flags


def test_log_settings_table_lists_every_setting() -> None:
    documented = {name for row in table("log-settings") for name in re.findall(r"`(\w+)`", row[0])}
    assert documented == LOG_SETTING_NAMES
