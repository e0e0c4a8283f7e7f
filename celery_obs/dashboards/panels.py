"""Shared pieces of every dashboard: variables, PromQL selectors, panel builders, layout.

Metric names come from the exporter's catalogue (`exporter.metrics`), never retyped here. Panels
use the datasource through the `datasource` variable's uid, and every query is filtered by the
`job`/`instance` (and where it applies `queue`/`task`) variables.

High availability: two exporter replicas on one broker export the same numbers under two
`instance` labels. Every aggregation first takes the max over the replica labels (`once()`), so
"All" instances shows the cluster once, the same as either replica alone. Where the shared
recording rules (celery_obs.rules.alerts) compute what a panel shows, the panel reads them: it
then shows the very number the alerts fire on.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from grafanalib import core as g

from celery_obs.exporter import metrics as m
from celery_obs.rules import alerts as rules
from celery_obs.rules.promql import DEDUP, OVERVIEW_UID, TASK_UID, WORKERS_UID

UIDS = (OVERVIEW_UID, TASK_UID, WORKERS_UID)

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SCHEMA_VERSION = 39
DEFAULT_KIBANA_URL = "http://localhost:5601"

#: label -> variable, in the order the filters are written.
FILTERS = {"job": "job", "instance": "instance", "queue_name": "queue", "name": "task"}
RATE = "$__rate_interval"
QUANTILES = (0.5, 0.95, 0.99)


def _matchers(labels: Sequence[str], fixed: dict[str, str]) -> str:
    """Filters for every dashboard variable the metric has a label for, plus fixed values."""
    matchers = [
        f'{label}=~"${var}"'
        for label, var in FILTERS.items()
        if label in ("job", "instance") or label in labels
    ]
    matchers += [f'{label}="{value}"' for label, value in fixed.items()]
    return ",".join(matchers)


def selector(spec: m.MetricSpec, suffix: str = "", **fixed: str) -> str:
    """`metric{job=~"$job",...}`."""
    return f"{spec.name}{suffix}{{{_matchers(spec.labels, fixed)}}}"


#: The labels a recording rule's name says it keeps (`job_queue_name:...`: job, queue_name).
_KEPT = re.compile(r"(?:^|_)(queue_name|name|job)(?=_|$)")


def recorded(rule: str) -> str:
    """A shared recording rule's series, filtered by the variables of the labels it keeps.
    They have no replica labels, so `$instance` does not apply to them."""
    kept = set(_KEPT.findall(rule.split(":")[0]))
    matchers = [f'{label}=~"${var}"' for label, var in FILTERS.items() if label in kept]
    return f"{rule}{{{','.join(matchers)}}}"


def once(expr: str) -> str:
    """`expr` with exporter replicas counted once (see the module docstring)."""
    return f"{DEDUP} ({expr})"


def _sum(expr: str, by: Sequence[str] = ()) -> str:
    grouping = f" by ({', '.join(by)})" if by else ""
    return f"sum{grouping} ({once(expr)})"


def total(spec: m.MetricSpec, by: Sequence[str] = (), **fixed: str) -> str:
    """A gauge summed over the cluster (replicas once)."""
    return _sum(selector(spec, **fixed), by)


def rate(spec: m.MetricSpec, by: Sequence[str] = (), **fixed: str) -> str:
    return _sum(f"rate({selector(spec, **fixed)}[{RATE}])", by)


def increase(spec: m.MetricSpec, by: Sequence[str] = (), **fixed: str) -> str:
    """How much a counter grew over the dashboard's time range."""
    return _sum(f"increase({selector(spec, **fixed)}[$__range])", by)


def quantile(q: float, spec: m.MetricSpec, by: Sequence[str] = (), **fixed: str) -> str:
    inner = f"rate({selector(spec, '_bucket', **fixed)}[{RATE}])"
    return f"histogram_quantile({q}, {_sum(inner, ['le', *by])})"


def failure_percent() -> str:
    """Failed / finished over 5 minutes, from the recording rules CeleryTaskFailureRateHigh
    uses; 0 while tasks finish and none fails."""
    failed = f"sum({recorded(rules.FAILED_RATE)})"
    finished = f"sum({recorded(rules.FINISHED_RATE)})"
    return f"100 * ({failed} or {finished} * 0) / ({finished} > 0)"


class ExemplarTarget(g.Target):
    """A Prometheus query that also fetches its exemplars (grafanalib has no field for it)."""

    def to_json_data(self) -> dict:
        return {**super().to_json_data(), "exemplar": True}


def target(
    expr: str, legend: str = "", ref: str = "A", instant: bool = False, exemplar: bool = False
) -> g.Target:
    return (ExemplarTarget if exemplar else g.Target)(
        expr=expr,
        legendFormat=legend,
        refId=ref,
        datasource=DATASOURCE,
        instant=instant,
        format="table" if instant else "time_series",
    )


def targets(pairs: Iterable[tuple[str, str]], exemplars: bool = False) -> list[g.Target]:
    """One target per (expr, legend). With `exemplars`, the first also fetches the exemplars
    (task ids) of the histogram it reads: once is enough, every quantile has the same ones."""
    return [
        target(expr, legend, chr(ord("A") + i), exemplar=exemplars and i == 0)
        for i, (expr, legend) in enumerate(pairs)
    ]


#: The data view `celery-obs setup kibana` installs (celery_obs.setup.assets.DATA_VIEW_ID).
KIBANA_DATA_VIEW = "celery-logs"


def kibana_link(field: str = "name") -> dict:
    """A data link to Kibana Discover, filtered on the task name of the clicked series."""
    query = f'celery.task.name:"${{__field.labels.{field}}}"'
    # Our data view (kibana/celery.ndjson), not whichever is the user's default.
    url = (
        "${kibana_url}/app/discover#/?_g=(time:(from:'${__from:date}',to:'${__to:date}'))"
        f"&_a=(index:'{KIBANA_DATA_VIEW}',query:(language:kuery,query:'{query}'))"
    )
    return {"title": "Logs of this task in Kibana", "url": url, "targetBlank": True}


def with_links(links: list[dict]) -> dict:
    return {"fieldConfig": {"defaults": {"links": links}}}


class Grid:
    """Places panels left to right on Grafana's 24-column grid, wrapping to new rows."""

    def __init__(self) -> None:
        self.x = self.y = self.row_height = 0

    def pos(self, width: int, height: int) -> g.GridPos:
        if self.x + width > 24:
            self.x, self.y, self.row_height = 0, self.y + self.row_height, 0
        pos = g.GridPos(h=height, w=width, x=self.x, y=self.y)
        self.x += width
        self.row_height = max(self.row_height, height)
        return pos

    def row(self, title: str) -> g.RowPanel:
        if self.x:
            self.x, self.y, self.row_height = 0, self.y + self.row_height, 0
        panel = g.RowPanel(title=title, gridPos=g.GridPos(h=1, w=24, x=0, y=self.y))
        self.y += 1
        return panel


def timeseries(
    grid: Grid,
    title: str,
    pairs: Iterable[tuple[str, str]],
    unit: str,
    description: str,
    width: int = 12,
    height: int = 8,
    extra: dict | None = None,
    exemplars: bool = False,
) -> g.TimeSeries:
    return g.TimeSeries(
        title=title,
        dataSource=DATASOURCE,
        targets=targets(pairs, exemplars),
        unit=unit,
        gridPos=grid.pos(width, height),
        description=description,
        legendDisplayMode="table",
        legendPlacement="right",
        legendCalcs=["lastNotNull", "max"],
        extraJson=extra,
    )


def throughput(grid: Grid, title: str = "Throughput by state") -> g.TimeSeries:
    pairs = [(rate(spec), kind.removeprefix("task-")) for kind, spec in m.TASK_COUNTERS.items()]
    return timeseries(
        grid,
        title,
        pairs,
        unit="ops",
        width=16,
        description="Task events per second, by lifecycle step.",
    )


def queue_length(grid: Grid, width: int = 12, height: int = 8) -> g.TimeSeries:
    return timeseries(
        grid,
        "Queue length",
        [(total(m.QUEUE_LENGTH, ["queue_name"]), "{{queue_name}}")],
        unit="short",
        width=width,
        height=height,
        description="Messages waiting in each broker queue.",
    )


def stat(
    grid: Grid,
    title: str,
    expr: str,
    unit: str,
    description: str,
    width: int = 4,
    height: int = 4,
    thresholds: list[dict] | None = None,
) -> g.Stat:
    return g.Stat(
        title=title,
        dataSource=DATASOURCE,
        targets=[target(expr)],
        format=unit,
        gridPos=grid.pos(width, height),
        description=description,
        reduceCalc="lastNotNull",
        graphMode="none",
        thresholds=thresholds or [],
        colorMode="value" if thresholds else "none",
    )


def top_table(
    grid: Grid,
    title: str,
    expr: str,
    label: str,
    description: str,
    width: int = 12,
    height: int = 8,
    links: list[dict] | None = None,
) -> g.Table:
    """An instant top-k table of one label and its count over the dashboard's time range."""
    return g.Table(
        title=title,
        dataSource=DATASOURCE,
        targets=[target(expr, ref="A", instant=True)],
        gridPos=grid.pos(width, height),
        description=description,
        unit="short",
        transformations=[
            {
                "id": "organize",
                "options": {
                    "excludeByName": {"Time": True},
                    "renameByName": {"Value": "count", label: label},
                },
            }
        ],
        sortBy=[g.TableSortByField(displayName="count", desc=True)],
        extraJson=with_links(links) if links else None,
    )


def last_ran_table(grid: Grid, width: int = 24, height: int = 8) -> g.Table:
    """Per task name: how long ago it was last sent, succeeded and failed (the dead-man's
    switches of periodic tasks, `celery-obs rules periodic`)."""
    columns = [
        ("since sent", m.TASK_LAST_AT["task-sent"]),
        ("since success", m.TASK_LAST_AT["task-succeeded"]),
        ("since failure", m.TASK_LAST_AT["task-failed"]),
    ]
    return g.Table(
        title="When each task last ran",
        dataSource=DATASOURCE,
        targets=[
            target(
                f"time() - max by (name) ({selector(spec)})", ref=chr(ord("A") + i), instant=True
            )
            for i, (_, spec) in enumerate(columns)
        ],
        gridPos=grid.pos(width, height),
        description="Time since each task name was last sent, last succeeded and last failed. "
        "A periodic task whose last success is older than its schedule missed a run; "
        "`celery-obs rules periodic` alerts on it. Empty: never since the exporter started.",
        unit="dtdurations",
        transformations=[
            {"id": "merge", "options": {}},
            {
                "id": "organize",
                "options": {
                    "excludeByName": {"Time": True},
                    "renameByName": {
                        f"Value #{chr(ord('A') + i)}": label for i, (label, _) in enumerate(columns)
                    },
                },
            },
        ],
        sortBy=[g.TableSortByField(displayName="since success", desc=True)],
    )


def query_variable(
    name: str, label: str, query: str, include_all: bool = True, multi: bool = True
) -> g.Template:
    return g.Template(
        name=name,
        label=label,
        query=query,
        dataSource=DATASOURCE,
        includeAll=include_all,
        multi=multi,
        allValue=".*" if include_all else None,
        default="$__all" if include_all else None,
        refresh=2,
        sort=1,
    )


def variables(task_single: bool = False, kibana_url: str = DEFAULT_KIBANA_URL) -> g.Templating:
    info = m.EXPORTER_BUILD_INFO.name
    received = m.TASK_COUNTERS["task-received"].name
    scoped = 'job=~"$job",instance=~"$instance"'
    return g.Templating(
        list=[
            g.Template(
                name="datasource",
                label="Data source",
                query="prometheus",
                type="datasource",
                default="Prometheus",
            ),
            query_variable("job", "Job", f"label_values({info}, job)"),
            query_variable(
                "instance", "Instance", f'label_values({info}{{job=~"$job"}}, instance)'
            ),
            query_variable("queue", "Queue", f"label_values({received}{{{scoped}}}, queue_name)"),
            query_variable(
                "task",
                "Task",
                f'label_values({received}{{{scoped},queue_name=~"$queue"}}, name)',
                include_all=not task_single,
                multi=not task_single,
            ),
            g.Template(
                name="kibana_url",
                label="Kibana URL",
                query=kibana_url,
                type="textbox",
                default=kibana_url,
                hide=2,
            ),
        ]
    )


def dashboard(
    title: str,
    uid: str,
    description: str,
    panels: list,
    templating: g.Templating,
    tags: Sequence[str] = ("celery",),
) -> g.Dashboard:
    return g.Dashboard(
        title=title,
        uid=uid,
        description=description,
        tags=list(tags),
        # The other celery-obs dashboards, keeping the time range and the variables.
        links=[
            g.DashboardLink(
                title="Celery dashboards",
                type="dashboards",
                tags=["celery"],
                asDropdown=True,
                includeVars=True,
                keepTime=True,
            )
        ],
        panels=panels,
        templating=templating,
        schemaVersion=SCHEMA_VERSION,
        timezone="browser",
        refresh="30s",
        time=g.Time("now-1h", "now"),
        graphTooltip=1,
    ).auto_panel_ids()
