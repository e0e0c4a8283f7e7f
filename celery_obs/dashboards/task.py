"""Task drill-down: one task (the `task` variable) through its whole lifecycle, with its errors."""

from __future__ import annotations

from grafanalib import core as g

from celery_obs.exporter import metrics as m
from celery_obs.rules.promql import TASK_UID

from .overview import EXEMPLARS
from .panels import (
    QUANTILES,
    Grid,
    dashboard,
    failure_percent,
    increase,
    kibana_link,
    quantile,
    rate,
    selector,
    throughput,
    timeseries,
    top_table,
    total,
    variables,
    with_links,
)


def build(kibana_url: str) -> g.Dashboard:
    grid = Grid()
    failed = m.TASK_COUNTERS["task-failed"]
    runtime = [
        (quantile(q, m.TASK_RUNTIME, by=["outcome"]), f"p{round(q * 100)} {{{{outcome}}}}")
        for q in QUANTILES
    ]
    panels = [
        grid.row("$task"),
        throughput(grid),
        timeseries(
            grid,
            "Failure rate",
            [(failure_percent(), "failed %")],
            unit="percent",
            description="Failed / (succeeded + failed) over 5 minutes, from the recording "
            "rules CeleryTaskFailureRateHigh alerts on.",
            width=8,
        ),
        timeseries(
            grid,
            "Runtime by outcome",
            runtime,
            unit="s",
            width=8,
            description=f"Execution time on the worker, by outcome. {EXEMPLARS}",
            exemplars=True,
        ),
        timeseries(
            grid,
            "Queue wait",
            [(quantile(q, m.TASK_QUEUE_WAIT), f"p{round(q * 100)}") for q in QUANTILES],
            unit="s",
            width=8,
            description=f"From task-sent (else task-received) to task-started, minus ETA "
            f"delays. {EXEMPLARS}",
            exemplars=True,
        ),
        timeseries(
            grid,
            "End-to-end latency",
            [(quantile(q, m.TASK_LATENCY), f"p{round(q * 100)}") for q in QUANTILES],
            unit="s",
            width=8,
            description=f"From task-sent (else task-received) to success or failure. {EXEMPLARS}",
            exemplars=True,
        ),
        timeseries(
            grid,
            "Running and waiting now",
            [
                (total(m.TASK_ACTIVE), "running"),
                (total(m.TASK_WAITING), "waiting on a worker"),
            ],
            unit="short",
            description="Tasks started and not finished, and tasks a worker received "
            "(prefetched) and has not started.",
            width=12,
        ),
        timeseries(
            grid,
            "Oldest running and waiting",
            [
                (f"max({selector(m.TASK_OLDEST_ACTIVE_AGE)})", "running for"),
                (f"max({selector(m.TASK_OLDEST_WAITING_AGE)})", "waiting for"),
            ],
            unit="s",
            width=12,
            description="Age of the longest-running task, and of the task waiting longest on "
            "a worker. A steady climb is a stuck task.",
        ),
        grid.row("Errors"),
        timeseries(
            grid,
            "Failures by exception",
            [(rate(failed, by=["name", "exception"]), "{{exception}}")],
            unit="ops",
            width=12,
            extra=with_links([kibana_link("name")]),
            description="Click a series for this task's logs in Kibana.",
        ),
        top_table(
            grid,
            "Exceptions",
            increase(failed, ["name", "exception"]),
            "exception",
            links=[kibana_link("name")],
            description="Failures by exception class over the dashboard's time range.",
        ),
        timeseries(
            grid,
            "Retries and revocations",
            [
                (rate(m.TASK_COUNTERS["task-retried"]), "retried"),
                (rate(m.TASK_COUNTERS["task-revoked"]), "revoked"),
                (rate(m.TASK_COUNTERS["task-rejected"]), "rejected"),
            ],
            unit="ops",
            description="Retries, revocations and rejections per second.",
            width=24,
        ),
    ]
    return dashboard(
        "Celery task drill-down",
        TASK_UID,
        "One Celery task: throughput, failures and exceptions, runtime, waits (celery-obs).",
        panels,
        variables(task_single=True, kibana_url=kibana_url),
    )
