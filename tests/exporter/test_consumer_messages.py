"""The consumer's kombu path (transports without a socket reader of our own), run whole against
kombu's in-memory transport: real kombu messages, the consumer's own queue and settings."""

from __future__ import annotations

import json
import threading
import uuid

from kombu import Connection, Exchange, Producer

from celery_obs.exporter.config import EventQueueOptions
from celery_obs.exporter.consumer import BrokerStatus, EventConsumer
from celery_obs.exporter.tracker import Tracker

from support import wait_for


def test_a_virtual_transport_is_consumed_past_the_prefetch_bad_messages_costing_only_themselves():
    # memory:// is one store per process: a name of its own keeps other tests' messages out.
    options = EventQueueOptions(prefix=f"ev-{uuid.uuid4().hex[:8]}", prefetch=2)
    tracker, lock = Tracker(), threading.Lock()
    consumer = EventConsumer(
        lambda: Connection("memory://"), tracker, lock, BrokerStatus(), queue_options=options
    )
    consumer.start()
    try:
        wait_for(lambda: consumer.status.connected, what="the consumer to connect")
        with Connection("memory://") as connection:
            producer = Producer(connection.channel(), Exchange("celeryev", type="topic"))
            for number in range(5):  # more than the prefetch: nothing may stay unacknowledged
                event = {"type": "task-sent", "uuid": f"t{number}", "name": "n", "queue": "q"}
                producer.publish([event], routing_key="task.multi", serializer="json")
            producer.publish(b"{not json", routing_key="task.sent", content_type="application/json")
            producer.publish(
                json.dumps({"type": "worker-heartbeat", "hostname": "w@h"}),
                routing_key="worker.heartbeat",
                content_type="application/json",
                content_encoding="utf-8",
            )

        def counted() -> bool:
            with lock:
                return tracker.stats.events_by_type == {"task-sent": 5, "worker-heartbeat": 1}

        wait_for(counted, timeout=10, what="every event counted")
        with lock:
            assert tracker.stats.malformed == {"decode": 1}
        assert consumer.status.reader == "kombu"
    finally:
        consumer.stop()
