"""The docs say what the code does: every reference table in docs/ is the rendering of the one
declaration it documents (metrics catalogue, flags, settings), every relative link resolves, and
the README stays a few screens long."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from celery_obs.exporter.config import SETTINGS as EXPORTER_SETTINGS
from celery_obs.exporter.metrics import CATALOGUE
from celery_obs.log_shipping.hooks import SETTINGS as LOG_SETTINGS
from celery_obs.setup.cli import ELASTICSEARCH_SETTINGS, KIBANA_SETTINGS

from support import ROOT

DOCS = ROOT / "docs"
README = ROOT / "README.md"


def block(path: Path, marker: str) -> str:
    text = path.read_text()
    return text.split(f"<!-- {marker}:start -->\n")[1].split(f"<!-- {marker}:end -->")[0]


def table(path: Path, marker: str) -> list[list[str]]:
    rows = [line for line in block(path, marker).strip().splitlines()[2:] if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def test_the_metric_table_equals_the_catalogue() -> None:
    documented = {
        (name.strip("`"), kind, tuple(re.findall(r"`(\w+)`", labels)))
        for name, kind, labels, _meaning in table(DOCS / "metrics.md", "metrics")
    }
    assert documented == {(spec.name, spec.type, spec.labels) for spec in CATALOGUE}


@pytest.mark.parametrize(
    ("path", "marker", "rendered"),
    [
        ("exporter.md", "flags", EXPORTER_SETTINGS.markdown()),
        (
            "worker-logs.md",
            "log-settings",
            LOG_SETTINGS.markdown(("name", "environment", "default", "meaning")),
        ),
        ("elastic-stack.md", "setup-elasticsearch", ELASTICSEARCH_SETTINGS.markdown()),
        ("elastic-stack.md", "setup-kibana", KIBANA_SETTINGS.markdown()),
    ],
)
def test_settings_tables_are_their_declarations_rendering(
    path: str, marker: str, rendered: str
) -> None:
    assert block(DOCS / path, marker) == rendered, (
        f"docs/{path} ({marker}) is stale; replace the table with:\n{rendered}"
    )


def markdown_files() -> list[Path]:
    return [README, ROOT / "CHANGELOG.md", *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.name)
def test_every_relative_link_resolves(path: Path) -> None:
    text = path.read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (path.parent / target).exists(), f"{path.name} links to missing {target}"
    for anchor_file, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", text):
        page = path.parent / anchor_file if anchor_file else path
        headings = {
            re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)
        }
        assert anchor in headings, f"{path.name}: #{anchor} is not a heading of {page.name}"


def test_the_readme_is_a_few_screens_and_links_every_reference() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    for doc in sorted(DOCS.glob("*.md")):
        assert f"docs/{doc.name}" in text, f"the README does not link docs/{doc.name}"


def promql_examples() -> list[str]:
    """The expressions of docs/metrics.md's PromQL blocks: lines up to a comment or blank."""
    text = (DOCS / "metrics.md").read_text()
    code = "\n\n".join(re.findall(r"```promql\n(.*?)```", text, flags=re.S))
    expressions: list[str] = []
    current: list[str] = []

    def flush() -> None:
        if current:
            expressions.append(" ".join(current))
            current.clear()

    for line in code.splitlines():
        if not line.strip() or line.startswith("#"):
            flush()
            continue
        joined = " ".join(current)
        balanced = joined.count("(") == joined.count(")")
        if current and line[0].isalpha() and balanced:  # a new expression starts
            flush()
        current.append(line.strip())
    flush()
    return expressions


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs Debian's prometheus")
def test_the_example_promql_parses(tmp_path: Path) -> None:
    examples = promql_examples()
    assert len(examples) >= 10
    rules = {
        "groups": [
            {
                "name": "examples",
                "rules": [{"record": f"example:{i}", "expr": e} for i, e in enumerate(examples)],
            }
        ]
    }
    path = tmp_path / "examples.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
