"""A private redis-server stopped and restarted under a running exporter and worker."""

from __future__ import annotations

import pytest

from brokers import RedisServer
from support import http_get, producer, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def test_exporter_survives_a_redis_restart(queue, start_exporter, start_worker):
    server = RedisServer()
    url = server.url()
    try:
        exporter = start_exporter(url)
        worker = start_worker(url, queue)
        exporter.wait_value("celery_worker_up", 1, hostname=worker.hostname)
        app = producer(url, queue)
        for i in range(3):
            app.send_task("obs.add", (i, i))
        exporter.wait_value("celery_task_succeeded_total", 3, name="obs.add", queue_name=queue)

        server.kill()

        def outage_reported() -> str | None:
            status, reason = exporter.healthz()
            return reason if status == 503 else None

        reason = wait_for(outage_reported, 15, "/healthz reporting the outage")
        assert reason.startswith(f"not connected to {url} for ")
        # Not ready (its metrics are stale), but alive: restarting it would not help.
        status, ready = http_get(f"{exporter.base}/readyz")
        assert status == 503
        assert ready.startswith(f"not connected to {url} for ")
        assert http_get(f"{exporter.base}/livez") == (
            200,
            "ok: alive, reconnecting to the broker\n",
        )
        assert exporter.scrape().value("celery_exporter_broker_connected") == 0

        server.start()  # same port, empty: as a restarted server without persistence
        exporter.wait_healthy(30)
        scrape = exporter.scrape()
        assert scrape.value("celery_exporter_broker_connected") == 1
        assert scrape.value("celery_exporter_broker_reconnects_total") == 1
        # Counters survive the outage.
        assert scrape.value("celery_task_succeeded_total", name="obs.add", queue_name=queue) == 3

        # The worker reconnects on its own; its events after the restart are counted.
        exporter.wait_value("celery_worker_up", 1, timeout=60, hostname=worker.hostname)
        app = producer(url, queue)
        for i in range(2):
            app.send_task("obs.add", (i, i))
        exporter.wait_value(
            "celery_task_succeeded_total", 5, timeout=30, name="obs.add", queue_name=queue
        )
    finally:
        server.close()
