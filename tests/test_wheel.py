"""The wheel is the whole product: built from the sdist, installed into a clean virtualenv with
no checkout on its path, it serves metrics (`celery-obs demo`), sets up Elasticsearch against a
fake cluster, exports assets equal to the repository's, and a worker with only the base install
imports log_shipping (no Elasticsearch client pulled in).
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from celery_obs.assets import ASSET_DIRS, listing

from es_mapping_model import ASSETS
from fakes import FakeElasticsearch
from support import ROOT, Process, Scrape, free_port, http_get, wait_for

pytestmark = pytest.mark.slow


def run(*args: str | Path, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{args}: {result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built the way a release is: sdist first, then the wheel from the sdist."""
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--outdir", out, ROOT, cwd=out)
    [wheel] = out.glob("celery_observability-*.whl")
    return wheel


@pytest.fixture(scope="module")
def installed(built: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean virtualenv with the wheel's base install: its bin/ directory."""
    home = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=True).create(home)
    bin_dir = home / "bin"
    run(bin_dir / "pip", "install", "--quiet", "--disable-pip-version-check", built, cwd=home)
    return bin_dir


def test_the_wheel_packs_every_asset_equal_to_its_source(built: Path) -> None:
    sources = listing(ROOT)
    assert {path.parts[0] for path in sources} == set(ASSET_DIRS)
    with zipfile.ZipFile(built) as wheel:
        packed = {
            Path(name).relative_to("celery_obs/_assets"): wheel.read(name)
            for name in wheel.namelist()
            if name.startswith("celery_obs/_assets/")
        }
        names = wheel.namelist()
    assert set(packed) == set(sources)
    for relative in sources:
        assert packed[relative] == (ROOT / relative).read_bytes(), relative
    # One import name; no test or bench code in the wheel.
    assert {name.split("/")[0] for name in names} == {
        "celery_obs",
        *{n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA")},
    }


def test_a_base_install_runs_the_product(installed: Path, tmp_path: Path) -> None:
    python = installed / "python"
    # Nothing of the checkout on the path: the installed copy is what runs.
    where = run(python, "-c", "import celery_obs; print(celery_obs.__file__)", cwd=tmp_path)
    assert str(ROOT) not in where.stdout
    assert "site-packages" in where.stdout

    # A worker that only wants JSON logs: log_shipping imports, no Elasticsearch client.
    worker = run(
        python,
        "-c",
        "from celery_obs import log_shipping; import importlib.util; "
        "print(importlib.util.find_spec('elasticsearch') is None)",
        cwd=tmp_path,
    )
    assert worker.stdout.strip() == "True"

    # The assets it carries, written out, equal the repository's.
    exported = tmp_path / "exported"
    run(installed / "celery-obs", "assets", "export", exported, cwd=tmp_path)
    sources = listing(ROOT)
    assert listing(exported) == sources
    for relative in sources:
        assert (exported / relative).read_bytes() == (ROOT / relative).read_bytes(), relative

    # `celery-obs setup elasticsearch` without the extra says what to install.
    missing = subprocess.run(
        [installed / "celery-obs", "setup", "elasticsearch", "--url", "http://127.0.0.1:9"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2
    assert "pip install 'celery-observability[elasticsearch]'" in missing.stderr


def test_the_demo_serves_counters_from_the_installed_wheel(installed: Path, tmp_path: Path) -> None:
    port = free_port()
    demo = Process(
        [str(installed / "celery-obs"), "demo", "--web.listen-address", f"127.0.0.1:{port}"],
        cwd=tmp_path,
        env={"PYTHONPATH": ""},
    )
    try:

        def succeeded() -> float:
            try:
                status, body = http_get(f"http://127.0.0.1:{port}/metrics")
            except OSError:
                return 0.0
            if status != 200:
                return 0.0
            series = Scrape(body).samples.get("celery_task_succeeded_total", {})
            return sum(series.values())

        wait_for(succeeded, 60, "the demo's tasks counted")
        assert "what next" in demo.output().lower()
    finally:
        demo.close()


def test_setup_elasticsearch_from_the_installed_wheel_with_the_extra(
    installed: Path, built: Path, tmp_path: Path
) -> None:
    run(
        installed / "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        f"{built}[elasticsearch]",
        cwd=tmp_path,
    )
    es = FakeElasticsearch()
    try:
        run(installed / "celery-obs", "setup", "elasticsearch", "--url", es.url, cwd=tmp_path)
        assert sorted(es.stored) == [
            "/_component_template/logs-celery@mappings",
            "/_ilm/policy/celery-logs",
            "/_index_template/logs-celery",
        ]
        # The packed templates are what went in.
        assert es.stored["/_index_template/logs-celery"] == ASSETS.index_template()
        compat = "application/vnd.elasticsearch+json; compatible-with=8"
        assert all(request.headers["accept"] == compat for request in es.requests)
    finally:
        es.close()
