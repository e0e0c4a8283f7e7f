"""An embedded Celery cluster to try the exporter with no services at all.

One process holds a worker (thread pool), a producer sending a small mixed load (fast and slow
tasks, two kinds of failure, retries, two queues) and the exporter. On the default `memory://`
transport everything stays inside this process, which is why the worker cannot be a separate one;
with `--broker-url` the same cluster runs on a real broker that other tools can watch too.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time

from celery import Celery
from celery.worker import WorkController

log = logging.getLogger(__name__)

DEMO_QUEUES = ("celery", "images")


class PaymentDeclined(Exception):
    pass


def build_app(broker_url: str) -> Celery:
    app = Celery("celery_obs_demo", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_send_sent_event=True,
        worker_send_task_events=True,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        task_routes={"demo.resize_image": {"queue": "images"}},
        task_ignore_result=True,
    )

    @app.task(name="demo.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="demo.resize_image")
    def resize_image(width: int) -> int:
        time.sleep(random.uniform(0.05, 0.4))  # noqa: S311 - demo load, not a secret
        return width // 2

    @app.task(name="demo.charge_card")
    def charge_card(amount: int) -> str:
        roll = random.random()  # noqa: S311 - demo load, not a secret
        if roll < 0.08:
            raise PaymentDeclined(f"card declined for {amount}")
        if roll < 0.12:
            raise TimeoutError("payment gateway timed out")
        return "ok"

    @app.task(name="demo.sync_inventory", bind=True, max_retries=2, default_retry_delay=0.5)
    def sync_inventory(self: object, sku: str) -> str:
        if random.random() < 0.2:  # noqa: S311 - demo load, not a secret
            raise self.retry(exc=ConnectionError("inventory service busy"))  # type: ignore[attr-defined]
        return sku

    return app


class DemoCluster:
    """Start a worker and a load generator in threads; `stop()` ends both."""

    def __init__(self, broker_url: str, tasks_per_second: float = 10.0) -> None:
        self.app = build_app(broker_url)
        self.hostname = f"demo@{socket.gethostname()}"
        self.tasks_per_second = tasks_per_second
        self._stopping = threading.Event()
        self._worker = WorkController(
            app=self.app,
            hostname=self.hostname,
            pool_cls="threads",
            concurrency=4,
            loglevel="WARNING",
            task_events=True,
            queues=list(DEMO_QUEUES),
            without_mingle=True,
            without_gossip=True,
        )
        self._threads = [
            threading.Thread(target=self._worker.start, name="demo-worker", daemon=True),
            threading.Thread(target=self._produce, name="demo-load", daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._worker.stop(in_sighandler=False)
        for thread in self._threads:
            thread.join(5)

    def _produce(self) -> None:
        tasks = self.app.tasks
        senders = [
            lambda i: tasks["demo.add"].delay(i, i),
            lambda i: tasks["demo.resize_image"].delay(640 + i),
            lambda i: tasks["demo.charge_card"].delay(100 + i),
            lambda i: tasks["demo.sync_inventory"].delay(f"sku-{i}"),
        ]
        interval, i = 1.0 / self.tasks_per_second, 0
        while not self._stopping.wait(interval):
            try:
                senders[i % len(senders)](i)
            except Exception as exc:  # a broker blip must not kill the demo load
                log.warning("demo producer: %s: %s", type(exc).__name__, exc)
            i += 1
