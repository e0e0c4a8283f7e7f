"""The compose demo's Celery app: what a user's app module looks like with celery-obs.

The `worker` service runs `celery -A demo_app worker -E`; the `load` service imports this module
to send tasks. Each task's outcome follows from its argument, not from chance, so the mix of
successes, failures, retries and slow runs is steady: the dashboards have every kind of data
within a minute, and `demo.charge_card` fails often enough (about 15%) for the
CeleryTaskFailureRateHigh alert to fire and reach the webhook receiver after its `for: 10m`.
"""

from __future__ import annotations

import os
import time

from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.utils.log import get_task_logger

from celery_obs import log_shipping

#: Queues the worker consumes and the exporter probes; docker-compose.yml names them too.
QUEUES = ("celery", "images", "reports")

app = Celery("demo", broker=os.environ.get("CELERY_BROKER_URL", "redis://redis:6379/0"))
app.conf.update(
    # task-sent is the only event that carries the queue; without it queue_name is "unknown".
    task_send_sent_event=True,
    worker_send_task_events=True,
    # No result backend: the demo reads outcomes from events and logs, as the stack does.
    task_ignore_result=True,
    task_routes={
        "demo.resize_image": {"queue": "images"},
        "demo.build_report": {"queue": "reports"},
    },
    # Slow reports must not sit prefetched behind one another while other processes idle.
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)

# The one line a user adds. Outputs, spool and credentials come from CELERY_OBS_LOG_* variables
# (docker-compose.yml sends to stdout and to Logstash's http input).
log_shipping.install(app, service_name="demo-worker")

logger = get_task_logger(__name__)


class PaymentDeclined(Exception):
    pass


@app.task(name="demo.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="demo.charge_card")
def charge_card(order: int) -> str:
    logger.info("charging order %s", order)
    if order % 9 == 0:
        raise PaymentDeclined(f"card declined for order {order}")
    if order % 23 == 0:
        raise TimeoutError("payment gateway timed out")
    return "charged"


@app.task(name="demo.sync_inventory", bind=True, max_retries=3)
def sync_inventory(self: Task, sku: int) -> int:
    # Order n needs n % 3 retries before it succeeds: a third of them retry twice.
    if self.request.retries < sku % 3:
        raise self.retry(exc=ConnectionError("inventory service busy"), countdown=1)
    return sku


@app.task(name="demo.resize_image")
def resize_image(width: int) -> int:
    time.sleep(0.2 + (width % 10) * 0.1)
    return width // 2


@app.task(name="demo.build_report", soft_time_limit=8, time_limit=12)
def build_report(report: int) -> str:
    # 2 to 9 s; one report in eight runs past the soft limit and fails.
    seconds = 2 + report % 8
    logger.info("building report %s (%ss)", report, seconds)
    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded:
        logger.warning("report %s took too long, giving up", report)
        raise
    return f"report-{report}.pdf"
