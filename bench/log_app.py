"""The Celery app `bench/logs.py prefork` runs: one no-op task, log_shipping installed or not
(BENCH_LOG_INSTALL=1/0), completions counted in Redis so the driver knows when all ran."""

import os

import redis
from celery import Celery

from celery_obs import log_shipping

BROKER = os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/13")

app = Celery("bench_logs", broker=BROKER)
app.conf.update(
    task_ignore_result=True,
    task_default_queue=os.environ.get("BENCH_QUEUE", "bench_logs"),
    worker_prefetch_multiplier=16,
    broker_connection_retry_on_startup=True,
)
if os.environ.get("BENCH_LOG_INSTALL") == "1":
    log_shipping.install(app, service_name="bench")

_counter = redis.Redis.from_url(BROKER)


@app.task(name="bench.noop")
def noop(key):
    _counter.incr(key)
