"""Render every dashboard to JSON, deterministically (sorted keys, fixed indent)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from grafanalib import core as g
from grafanalib._gen import DashboardEncoder

from . import overview, task, workers
from .clean import clean
from .panels import DEFAULT_KIBANA_URL

#: file name -> builder. The compose stack provisions grafana/dashboards/ from these files.
DASHBOARDS: dict[str, Callable[[str], g.Dashboard]] = {
    "celery-overview.json": overview.build,
    "celery-task.json": task.build,
    "celery-workers-queues.json": workers.build,
}

DEFAULT_OUT = Path("grafana") / "dashboards"


def render(builder: Callable[[str], g.Dashboard], kibana_url: str = DEFAULT_KIBANA_URL) -> str:
    # Through grafanalib's encoder first: it turns its objects into plain JSON values.
    data = json.loads(json.dumps(builder(kibana_url).to_json_data(), cls=DashboardEncoder))
    return json.dumps(clean(data), sort_keys=True, indent=2) + "\n"


def write_all(out: Path = DEFAULT_OUT, kibana_url: str = DEFAULT_KIBANA_URL) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, builder in DASHBOARDS.items():
        path = out / filename
        path.write_text(render(builder, kibana_url))
        written.append(path)
    return written
