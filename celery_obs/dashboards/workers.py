"""Workers and queues: who is alive and busy, and how deep and slow each queue is."""

from __future__ import annotations

from grafanalib import core as g

from celery_obs.exporter import metrics as m

from .panels import (
    DATASOURCE,
    Grid,
    dashboard,
    quantile,
    queue_length,
    rate,
    selector,
    target,
    targets,
    timeseries,
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
            description="Up while heartbeats arrive; offline after a warm shutdown "
            "(worker-offline); lost when heartbeats stopped without one (killed, OOM, lost node).",
        ),
        timeseries(
            grid,
            "Active tasks",
            [(f"sum by (hostname) ({selector(m.WORKER_TASKS_ACTIVE)})", "{{hostname}}")],
            width=8,
        ),
        timeseries(
            grid,
            "Processed per second",
            [(rate(m.WORKER_TASKS_PROCESSED, by=["hostname"]), "{{hostname}}")],
            unit="ops",
            width=8,
        ),
        timeseries(
            grid,
            "Heartbeat age",
            [(f"time() - max by (hostname) ({selector(m.WORKER_LAST_HEARTBEAT)})", "{{hostname}}")],
            unit="s",
            width=8,
        ),
        timeseries(
            grid,
            "Reserved (prefetched) tasks",
            [(f"sum by (hostname) ({selector(m.WORKER_TASKS_RESERVED)})", "{{hostname}}")],
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
            [(quantile(0.95, m.TASK_QUEUE_WAIT, by=["queue_name"]), "{{queue_name}}")],
            unit="s",
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
            width=24,
        ),
    ]
    return dashboard(
        "Celery workers and queues",
        "celery-workers-queues",
        "Per-worker liveness and load, per-queue depth and wait (celery-obs).",
        panels,
        variables(kibana_url=kibana_url),
    )
