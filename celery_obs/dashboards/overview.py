"""Celery overview: is the cluster healthy? Throughput, failures, latency, queues, workers."""

from __future__ import annotations

from grafanalib import core as g

from celery_obs.exporter import metrics as m
from celery_obs.rules.promql import OVERVIEW_UID

from .panels import (
    QUANTILES,
    Grid,
    dashboard,
    failure_percent,
    increase,
    kibana_link,
    last_ran_table,
    once,
    quantile,
    queue_length,
    rate,
    recorded,
    rules,
    selector,
    stat,
    throughput,
    timeseries,
    top_table,
    total,
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
    # max, not sum: replicas report the same ages (and max of the oldest is the oldest).
    oldest = "max by (name) ({})"
    return [
        grid.row("Stuck and waiting"),
        timeseries(
            grid,
            "Running now",
            [(total(m.TASK_ACTIVE, ["name"]), "{{name}}")],
            unit="short",
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
            [(total(m.TASK_WAITING, ["name"]), "{{name}}")],
            unit="short",
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
            f"{increase(m.TASK_WORKER_LOST, ['name'])} > 0",
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
            description="Failed / (succeeded + failed) over 5 minutes, from the recording "
            "rules CeleryTaskFailureRateHigh alerts on.",
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
            f"topk(10, {increase(failed, ['name'])})",
            "name",
            description="Failures over the dashboard's time range; click a task for its logs.",
            links=[kibana_link("name")],
        ),
        top_table(
            grid,
            "Top exceptions",
            f"topk(10, {increase(failed, ['exception'])})",
            "exception",
            description="Failures by exception class over the time range.",
        ),
        *stuck_and_waiting(grid),
        grid.row("Queues and workers"),
        queue_length(grid),
        stat(
            grid,
            "Workers up",
            f"sum({recorded(rules.WORKERS_UP)}) or vector(0)",
            unit="short",
            width=6,
            height=4,
            description="Workers sending heartbeats (the recording rule "
            "job:celery_workers_up:sum).",
        ),
        stat(
            grid,
            "Workers lost",
            f"count({once(selector(m.WORKER_LOST))} == 1) or vector(0)",
            unit="short",
            width=6,
            height=4,
            description="Workers silent past --worker-timeout without a warm shutdown (killed, "
            "OOM, lost node), kept for the retention. Workers shut down warmly are not lost.",
            thresholds=[{"color": "green", "value": None}, {"color": "red", "value": 1}],
        ),
        timeseries(
            grid,
            "Active tasks per worker",
            [(total(m.WORKER_TASKS_ACTIVE, ["hostname"]), "{{hostname}}")],
            unit="short",
            description="Tasks each worker is running now, from its heartbeats.",
            width=12,
            height=4,
        ),
        grid.row("Exporter"),
        stat(
            grid,
            "Broker connected",
            f"min({selector(m.EXPORTER_BROKER_CONNECTED)})",
            unit="bool_yes_no",
            description="Whether every exporter instance shown is connected to the broker (the "
            "lowest of them).",
            thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 1}],
        ),
        stat(
            grid,
            "Events/s",
            rate(m.EXPORTER_EVENTS),
            unit="ops",
            description="Events the exporter reads from the broker per second (replicas once).",
        ),
        stat(
            grid,
            "Last event age",
            f"time() - max({selector(m.EXPORTER_LAST_EVENT)})",
            unit="s",
            description="Time since the newest event any exporter instance read. Heartbeats "
            "arrive every 2 s while a worker is up: a rising age means no events.",
            thresholds=[{"color": "green", "value": None}, {"color": "red", "value": 60}],
        ),
        stat(
            grid,
            "Malformed events",
            f"{increase(m.EXPORTER_MALFORMED)} or vector(0)",
            unit="short",
            description="Events the exporter could not decode and skipped, over the time "
            "range (its log names each kind once).",
        ),
        stat(
            grid,
            "Evicted tasks",
            f"{increase(m.EXPORTER_TASKS_EVICTED)} or vector(0)",
            unit="short",
            description="Unfinished tasks dropped from the exporter's table when it was full "
            "(--max-tracked-tasks), over the time range.",
        ),
        stat(
            grid,
            "Reconnects",
            f"{increase(m.EXPORTER_RECONNECTS)} or vector(0)",
            unit="short",
            description="Times the exporter reconnected to the broker over the time range.",
        ),
    ]
    return dashboard(
        "Celery overview",
        OVERVIEW_UID,
        "Throughput, failures, latency, queues and workers of a Celery cluster (celery-obs).",
        panels,
        variables(kibana_url=kibana_url),
    )
