"""The Celery app the real-broker tests run in a real `celery worker` process.

Broker and queue come from the environment so each test can point it at its own Redis database
or RabbitMQ vhost. The broker has no default: a worker started without one must fail, not reach
the machine's shared Redis on 6379. Every task exists to produce one kind of lifecycle the
exporter must count.
"""

import os
import time

from celery import Celery
from celery.exceptions import Reject

app = Celery("obs_test", broker=os.environ["OBS_TEST_BROKER"])
app.conf.update(
    task_send_sent_event=True,
    # -E's default: a worker started without -E (OBS_TEST_TASK_EVENTS=0) must really send no
    # task events, or a test of `enable_events` could not fail.
    worker_send_task_events=os.environ.get("OBS_TEST_TASK_EVENTS", "1") == "1",
    task_default_queue=os.environ.get("OBS_TEST_QUEUE", "obs_test"),
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
)


class PaymentDeclined(Exception):
    pass


@app.task(name="obs.add")
def add(x, y):
    return x + y


@app.task(name="obs.fail_value")
def fail_value():
    raise ValueError("bad value")


@app.task(name="obs.fail_payment")
def fail_payment():
    raise PaymentDeclined("declined")


@app.task(name="obs.retry_once", bind=True, max_retries=3)
def retry_once(self):
    if self.request.retries == 0:
        raise self.retry(countdown=0.1)
    return "ok"


@app.task(name="obs.sleep", time_limit=1)
def sleep(seconds):
    time.sleep(seconds)


@app.task(name="obs.reject", acks_late=True)
def reject():
    raise Reject("not for us", requeue=False)


# -- retries, as users write them (the workloads of the recorded streams and the differential
#    test). Each takes its failure count as an argument so one task name covers one shape.


class Flaky(Exception):
    pass


@app.task(
    name="obs.autoretry",
    bind=True,
    autoretry_for=(Flaky,),
    retry_backoff=1,
    retry_backoff_max=2,
    retry_jitter=False,
    max_retries=5,
)
def autoretry(self, failures=2):
    """autoretry_for with exponential backoff (1 s, 2 s): fails `failures` times, then succeeds."""
    if self.request.retries < failures:
        raise Flaky(f"attempt {self.request.retries}")
    return self.request.retries


@app.task(name="obs.retry_countdown", bind=True, max_retries=10)
def retry_countdown(self, retries=1, countdown=1.0):
    """self.retry(countdown=...) `retries` times, then succeeds (countdown=0: straight back)."""
    if self.request.retries < retries:
        raise self.retry(countdown=countdown)
    return self.request.retries


@app.task(name="obs.retry_exhaust", bind=True, max_retries=2)
def retry_exhaust(self, countdown=0.2):
    """Always retries: the third attempt fails with MaxRetriesExceededError."""
    raise self.retry(countdown=countdown)


@app.task(name="obs.retry_pow2", bind=True, max_retries=5)
def retry_pow2(self, retries=3):
    """self.retry(countdown=2 ** retries): 1 s, 2 s, 4 s."""
    if self.request.retries < retries:
        raise self.retry(countdown=2**self.request.retries)
    return self.request.retries


# -- redeliveries: the same attempt delivered again, or the same id sent again.


@app.task(name="obs.replaced", bind=True)
def replaced(self):
    """Task.replace(): the replacement runs under this task's id; this run ends with Ignore."""
    raise self.replace(add.si(1, 1))


@app.task(name="obs.requeue_once", bind=True, acks_late=True)
def requeue_once(self, marker):
    """Reject(requeue=True) on the first delivery (the marker file does not exist yet)."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise Reject("not yet", requeue=True)
    return "ok"


@app.task(name="obs.time_limit_requeue", acks_late=True, acks_on_timeout=False, time_limit=1)
def time_limit_requeue(marker):
    """A hard time limit under acks_late: rejected (requeued), failed, delivered again, done."""
    if os.path.exists(marker):
        return "ok"
    open(marker, "w").close()
    time.sleep(5)


@app.task(name="obs.retry_elsewhere", bind=True, max_retries=1)
def retry_elsewhere(self, queue):
    """Retries once on another queue."""
    if self.request.retries == 0:
        raise self.retry(queue=queue, countdown=0)
    return queue


@app.task(name="obs.wait_for")
def wait_for_file(path, timeout=60.0):
    """Runs until `path` exists (the test creates it), at most `timeout` seconds: a task that is
    running for as long as the test wants, without a fixed sleep."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.02)
    return path
