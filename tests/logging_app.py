"""A Celery app with log_shipping installed, run by the log tests in a real prefork worker."""

import itertools
import logging
import os
import time

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from celery.utils.log import get_task_logger

from celery_obs import log_shipping

# The broker has no default (a stray run must not reach the machine's shared Redis on 6379); a
# result backend only where a test runs a chord (it needs one).
backend = os.environ.get("OBS_TEST_BACKEND")
app = Celery(
    "obs_logs",
    broker=os.environ["OBS_TEST_BROKER"],
    backend=backend,
)
app.conf.update(
    task_default_queue=os.environ.get("OBS_TEST_QUEUE", "obs_logs"),
    task_ignore_result=backend is None,
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=os.environ.get("OBS_TEST_HIJACK", "1") == "1",
)
log_shipping.install(app, service_name="obs-test", include_args=True)

task_logger = get_task_logger(__name__)
plain_logger = logging.getLogger("obs.plain")


@app.task(name="logs.add")
def add(x, y, password=None):
    task_logger.info("adding %s and %s", x, y)
    plain_logger.warning("plain logging inside a task")
    print("printed inside a task")
    return x + y


@app.task(name="logs.fail")
def fail():
    raise ValueError("bad value")


@app.task(name="logs.retry_once", bind=True, max_retries=3)
def retry_once(self):
    if self.request.retries == 0:
        raise self.retry(countdown=0.1)
    return "ok"


@app.task(name="logs.sleep", time_limit=1)
def sleep(seconds):
    time.sleep(seconds)


@app.task(name="logs.soft_limit", soft_time_limit=0.5)
def soft_limit():
    try:
        time.sleep(10)
    except SoftTimeLimitExceeded:
        return "stopped at the soft limit"


@app.task(name="logs.long")
def long(seconds):
    time.sleep(seconds)


@app.task(name="logs.total")
def total(values):
    return sum(values)


_ticks = itertools.count()  # per process: the shipping test checks each pid's sequence


@app.task(name="logs.tick")
def tick():
    task_logger.info("tick %d", next(_ticks))
