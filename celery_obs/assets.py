"""The product's files that are not Python: Prometheus rules and their promtool tests, Grafana
dashboards and provisioning, the Logstash pipeline, Elasticsearch templates, Kibana objects.

Their single source is the repository's top-level folders (`prometheus/`, `grafana/`,
`logstash/`, `elasticsearch/`, `kibana/`), readable without Python. The wheel carries a copy,
packed at build time (`setup.py`) as package data under `celery_obs/_assets/`. `root()` finds
them: the package data of an installed wheel, else the source checkout this package was imported
from (an editable install, or tests run from the repository).
"""

from __future__ import annotations

import shutil
from importlib.resources import files
from pathlib import Path

#: The top-level folders packed into the wheel, in this order in listings.
ASSET_DIRS = ("prometheus", "grafana", "logstash", "elasticsearch", "kibana")
#: Where the wheel keeps them inside the package.
PACKED = "_assets"


class AssetsNotFound(Exception):
    """Neither packed assets nor a source checkout: the message says what to do."""


def _complete(directory: Path) -> bool:
    return all((directory / name).is_dir() for name in ASSET_DIRS)


def packed_root() -> Path | None:
    """The assets inside the installed package (a wheel), if it carries them."""
    packed = Path(str(files("celery_obs"))) / PACKED
    return packed if _complete(packed) else None


def checkout_root() -> Path | None:
    """The repository this package was imported from, if it is one."""
    checkout = Path(__file__).resolve().parent.parent
    return checkout if _complete(checkout) else None


def root() -> Path:
    found = packed_root() or checkout_root()
    if found is None:
        raise AssetsNotFound(
            "the rules, dashboards and templates are missing from this installation: install "
            "the celery-observability wheel (pip install celery-observability, or pip install . "
            "from a checkout), which carries them"
        )
    return found


def listing(base: Path | None = None) -> list[Path]:
    """Every asset file, relative to the assets root, sorted."""
    base = base or root()
    found = []
    for name in ASSET_DIRS:
        for path in sorted((base / name).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                found.append(path.relative_to(base))
    return found


def export(destination: Path) -> list[Path]:
    """Copy every asset under `destination` (its folders as in the repository)."""
    base = root()
    written = []
    for relative in listing(base):
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(base / relative, target)
        written.append(target)
    return written
