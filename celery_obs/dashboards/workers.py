"""Workers and queues: who is alive and busy, and how deep and slow each queue is."""

from __future__ import annotations

from grafanalib import core as g

from celery_obs.exporter import metrics as m
from celery_obs.rules.promql import WORKERS_UID

from .panels import (
    DATASOURCE,
    Grid,
    dashboard,
    queue_length,
    rate,
    recorded,
    rules,
    selector,
    target,
    targets,
    timeseries,
    total,
    variables,
)


def build(kibana_url: str) -> g.Dashboard:
    grid = Grid()
    panels = [
        grid.row("Workers"),
        g.StateTimeline(
            title="Worker liveness",
            dataSource=DATASOURCE,
            gridPos=grid.pos(24, 8),
            # 1 up, 0 shut down warmly (worker-offline), 2 lost (lost implies not up).
            targets=targets(
                [
                    (
                        f"max by (hostname) ({selector(m.WORKER_UP)})"
                        f" + 2 * max by (hostname) ({selector(m.WORKER_LOST)})",
                        "{{hostname}}",
                    )
                ]
            ),
            mappings=[
                {
                    "type": "value",
                    "options": {
                        "0": {"text": "offline", "color": "text"},
                        "1": {"text": "up", "color": "green"},
                        "2": {"text": "lost", "color": "red"},
                    },
                }
            ],
            # The values are states, named by the mappings: no unit to scale them by.
            extraJson={"fieldConfig": {"defaults": {"unit": "none"}}},
            description="Up while heartbeats arrive; offline after a warm shutdown "
            "(worker-offline); lost when heartbeats stopped without one (killed, OOM, lost node).",
        ),
        timeseries(
            grid,
            "Active tasks",
            [(total(m.WORKER_TASKS_ACTIVE, ["hostname"]), "{{hostname}}")],
            unit="short",
            description="Tasks each worker is running now, from its heartbeats.",
            width=8,
        ),
        timeseries(
            grid,
            "Processed per second",
            [(rate(m.WORKER_TASKS_PROCESSED, by=["hostname"]), "{{hostname}}")],
            unit="ops",
            description="Tasks each worker finished per second (its heartbeats' processed count).",
            width=8,
        ),
        timeseries(
            grid,
            "Heartbeat age",
            [(f"time() - max by (hostname) ({selector(m.WORKER_LAST_HEARTBEAT)})", "{{hostname}}")],
            unit="s",
            description="Time since each worker's last heartbeat (every 2 s while it is up).",
            width=8,
        ),
        timeseries(
            grid,
            "Reserved (prefetched) tasks",
            [(total(m.WORKER_TASKS_RESERVED, ["hostname"]), "{{hostname}}")],
            unit="short",
            width=8,
            description="Tasks a worker received and has not started. Many on one worker "
            "while others idle: it prefetches behind long tasks (-O fair, prefetch 1).",
        ),
        timeseries(
            grid,
            "Load average (1 minute)",
            [
                (
                    f"max by (hostname) ({selector(m.WORKER_LOAD_AVERAGE, window='1m')})",
                    "{{hostname}}",
                )
            ],
            unit="short",
            width=8,
            description="The worker host's load average, from its heartbeats.",
        ),
        g.Table(
            title="What each worker runs",
            dataSource=DATASOURCE,
            targets=[
                target(
                    f"max by (hostname, sw_ver, sw_sys) ({selector(m.WORKER_INFO)})", instant=True
                )
            ],
            gridPos=grid.pos(8, 8),
            description="The Celery version (sw_ver) and OS each worker reports.",
            unit="none",
            transformations=[
                {
                    "id": "organize",
                    "options": {
                        "excludeByName": {"Time": True, "Value": True},
                        "renameByName": {"sw_ver": "Celery", "sw_sys": "OS"},
                    },
                }
            ],
        ),
        grid.row("Queues"),
        queue_length(grid),
        timeseries(
            grid,
            "Queue wait p95",
            [(f"max by (queue_name) ({recorded(rules.QUEUE_WAIT_P95)})", "{{queue_name}}")],
            unit="s",
            description="95th percentile of the time tasks of every name waited on each queue, "
            "over 5 minutes: the recording rule CeleryQueueWaitHigh alerts on (the task "
            "variable does not apply).",
            width=12,
        ),
        timeseries(
            grid,
            "Sent and received per queue",
            [
                (rate(m.TASK_COUNTERS["task-sent"], by=["queue_name"]), "sent {{queue_name}}"),
                (
                    rate(m.TASK_COUNTERS["task-received"], by=["queue_name"]),
                    "received {{queue_name}}",
                ),
            ],
            unit="ops",
            description="Tasks published to (task-sent, needs task_send_sent_event) and "
            "received from each queue per second.",
            width=24,
        ),
    ]
    return dashboard(
        "Celery workers and queues",
        WORKERS_UID,
        "Per-worker liveness and load, per-queue depth and wait (celery-obs).",
        panels,
        variables(kibana_url=kibana_url),
    )
