"""Render every dashboard to JSON, deterministically (sorted keys, fixed indent)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from grafanalib import core as g
from grafanalib._gen import DashboardEncoder

from . import overview, task, workers
from .panels import DEFAULT_KIBANA_URL

#: file name -> builder. The compose stack provisions grafana/dashboards/ from these files.
DASHBOARDS: dict[str, Callable[[str], g.Dashboard]] = {
    "celery-overview.json": overview.build,
    "celery-task.json": task.build,
    "celery-workers-queues.json": workers.build,
}

DEFAULT_OUT = Path("grafana") / "dashboards"


def render(builder: Callable[[str], g.Dashboard], kibana_url: str = DEFAULT_KIBANA_URL) -> str:
    data = builder(kibana_url).to_json_data()
    if not data.get("rows"):
        del data["rows"]  # grafanalib's legacy (pre-gridPos) layout; our panels carry gridPos
    return json.dumps(data, sort_keys=True, indent=2, cls=DashboardEncoder) + "\n"


def write_all(out: Path = DEFAULT_OUT, kibana_url: str = DEFAULT_KIBANA_URL) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, builder in DASHBOARDS.items():
        path = out / filename
        path.write_text(render(builder, kibana_url))
        written.append(path)
    return written
