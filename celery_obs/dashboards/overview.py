"""Celery overview: is the cluster healthy? Throughput, failures, latency, queues, workers."""

from __future__ import annotations

from grafanalib import core as g

from celery_obs.exporter import metrics as m

from .panels import (
    QUANTILES,
    Grid,
    dashboard,
    failure_percent,
    kibana_link,
    last_ran_table,
    quantile,
    queue_length,
    rate,
    selector,
    stat,
    throughput,
    timeseries,
    top_table,
    variables,
)

STATES = [kind.removeprefix("task-") for kind in m.TASK_COUNTERS]
EXEMPLARS = "The dots are exemplars: one task each; click one for its logs in Kibana."


def latency_panel(grid: Grid, title: str, spec: m.MetricSpec, description: str) -> g.TimeSeries:
    pairs = [(quantile(q, spec), f"p{round(q * 100)}") for q in QUANTILES]
    return timeseries(
        grid,
        title,
        pairs,
        unit="s",
        width=8,
        description=f"{description} {EXEMPLARS}",
        exemplars=True,
    )


def stuck_and_waiting(grid: Grid) -> list:
    """What runs and waits on the workers now, and for how long the oldest has."""
    by_name = "sum by (name) ({})"
    oldest = "max by (name) ({})"
    return [
        grid.row("Stuck and waiting"),
        timeseries(
            grid,
            "Running now",
            [(by_name.format(selector(m.TASK_ACTIVE)), "{{name}}")],
            width=6,
            description="Tasks started and not finished, by task name.",
        ),
        timeseries(
            grid,
            "Oldest running",
            [(oldest.format(selector(m.TASK_OLDEST_ACTIVE_AGE)), "{{name}}")],
            unit="s",
            width=6,
            description="How long the longest-running task of each name has run. A line that "
            "climbs steadily is a stuck task (CeleryTaskRunningLong past an hour).",
        ),
        timeseries(
            grid,
            "Waiting on workers",
            [(by_name.format(selector(m.TASK_WAITING)), "{{name}}")],
            width=6,
            description="Tasks a worker received (prefetched) and has not started; ETA tasks "
            "from their ETA on.",
        ),
        timeseries(
            grid,
            "Oldest waiting on a worker",
            [(oldest.format(selector(m.TASK_OLDEST_WAITING_AGE)), "{{name}}")],
            unit="s",
            width=6,
            description="How long the task waiting longest on a worker has waited: prefetched "
            "behind long tasks (CeleryTasksWaitingOnBusyWorkers past 5 minutes).",
        ),
        top_table(
            grid,
            "Tasks lost with their worker",
            f"sum by (name) (increase({selector(m.TASK_WORKER_LOST)}[$__range])) > 0",
            "name",
            width=8,
            description="Tasks running or held on a worker when it was lost or restarted "
            "without shutting down, over the time range.",
            links=[kibana_link("name")],
        ),
        last_ran_table(grid, width=16),
    ]


def build(kibana_url: str) -> g.Dashboard:
    grid = Grid()
    failed = m.TASK_COUNTERS["task-failed"]
    panels = [
        grid.row("Tasks"),
        throughput(grid, "Task throughput by state"),
        timeseries(
            grid,
            "Failure rate",
            [(failure_percent(), "failed %")],
            unit="percent",
            width=8,
            description="Failed / (succeeded + failed).",
        ),
        latency_panel(grid, "Runtime", m.TASK_RUNTIME, "Execution time on the worker."),
        latency_panel(
            grid,
            "Queue wait",
            m.TASK_QUEUE_WAIT,
            "task-sent (else task-received) to task-started, minus ETA delays.",
        ),
        latency_panel(
            grid,
            "End-to-end latency",
            m.TASK_LATENCY,
            "task-sent (else task-received) to success or failure.",
        ),
        top_table(
            grid,
            "Top failing tasks",
            f"topk(10, sum by (name) (increase({selector(failed)}[$__range])))",
            "name",
            description="Failures over the dashboard's time range; click a task for its logs.",
            links=[kibana_link("name")],
        ),
        top_table(
            grid,
            "Top exceptions",
            f"topk(10, sum by (exception) (increase({selector(failed)}[$__range])))",
            "exception",
            description="Failures by exception class over the time range.",
        ),
        *stuck_and_waiting(grid),
        grid.row("Queues and workers"),
        queue_length(grid),
        stat(
            grid,
            "Workers up",
            f"sum({selector(m.WORKER_UP)} == 1) or vector(0)",
            width=6,
            height=4,
            description="Workers sending heartbeats.",
        ),
        stat(
            grid,
            "Workers lost",
            f"count({selector(m.WORKER_LOST)} == 1) or vector(0)",
            width=6,
            height=4,
            description="Workers silent past --worker-timeout without a warm shutdown (killed, "
            "OOM, lost node), kept for the retention. Workers shut down warmly are not lost.",
            thresholds=[{"color": "green", "value": None}, {"color": "red", "value": 1}],
        ),
        timeseries(
            grid,
            "Active tasks per worker",
            [(f"sum by (hostname) ({selector(m.WORKER_TASKS_ACTIVE)})", "{{hostname}}")],
            width=12,
            height=4,
        ),
        grid.row("Exporter"),
        stat(
            grid,
            "Broker connected",
            f"min({selector(m.EXPORTER_BROKER_CONNECTED)})",
            thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 1}],
        ),
        stat(grid, "Events/s", rate(m.EXPORTER_EVENTS), unit="ops"),
        stat(
            grid,
            "Last event age",
            f"time() - max({selector(m.EXPORTER_LAST_EVENT)})",
            unit="s",
            thresholds=[{"color": "green", "value": None}, {"color": "red", "value": 60}],
        ),
        stat(
            grid,
            "Malformed events",
            f"sum(increase({selector(m.EXPORTER_MALFORMED)}[$__range])) or vector(0)",
        ),
        stat(
            grid, "Evicted tasks", f"sum(increase({selector(m.EXPORTER_TASKS_EVICTED)}[$__range]))"
        ),
        stat(grid, "Reconnects", f"sum(increase({selector(m.EXPORTER_RECONNECTS)}[$__range]))"),
    ]
    return dashboard(
        "Celery overview",
        "celery-overview",
        "Throughput, failures, latency, queues and workers of a Celery cluster (celery-obs).",
        panels,
        variables(kibana_url=kibana_url),
    )
