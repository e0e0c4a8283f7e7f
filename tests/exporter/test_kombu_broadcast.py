"""The exporter's broadcasts on RabbitMQ, held to what Celery's `app.control.broadcast` sends."""

from __future__ import annotations

import json

from celery import Celery
from kombu import Connection, Exchange, Queue

from celery_obs.exporter.consumer import BrokerStatus
from celery_obs.exporter.control import KombuBroadcaster, WorkerControl

from brokers import RabbitVhost
from support import wait_for


def test_a_rabbitmq_broadcast_is_celerys_own(rabbit: RabbitVhost) -> None:
    url = rabbit.url()
    with Connection(url) as connection:
        # A fanout queue of our own on the test's vhost hears every broadcast, as a worker does.
        exchange = Exchange("celery.pidbox", type="fanout", durable=False, delivery_mode=1)
        heard = Queue("obs-test-pidbox", exchange, exclusive=True)
        channel = connection.default_channel
        heard(channel).declare()

        app = Celery(broker=url, set_as_current=False)
        app.control.broadcast("enable_events")
        app.close()
        KombuBroadcaster(url, {}, clock=lambda: 1000.0).broadcast(["enable_events"])

        theirs, ours = (
            wait_for(lambda: heard(channel).get(no_ack=True), 10, "a broadcast") for _ in range(2)
        )
    assert ours.delivery_info["exchange"] == theirs.delivery_info["exchange"] == "celery.pidbox"
    assert (
        json.loads(ours.body)
        == json.loads(theirs.body)
        == {
            "method": "enable_events",
            "arguments": {},
            "destination": None,
            "pattern": None,
            "matcher": None,
        }
    )
    assert ours.headers == {"clock": 1, "expires": 1001.0}
    assert ours.headers.keys() == theirs.headers.keys()
    for key in ("content_type", "content_encoding"):
        assert getattr(ours, key) == getattr(theirs, key), key
    mine, celerys = dict(ours.properties), dict(theirs.properties)
    for properties in (mine, celerys):
        properties.pop("correlation_id", None)
        properties.pop("application_headers", None)  # the headers, compared above
    assert mine == celerys


def test_a_broadcast_to_a_refusing_broker_is_counted_and_does_not_hang(rabbit: RabbitVhost) -> None:
    # One attempt a round: a wrong password fails the round at once (kombu's own retry loop
    # would hold the thread), and the failure is counted.
    status = BrokerStatus()
    control = WorkerControl(
        rabbit.url(password="wrong"), {}, enable_events=True, interval=3600, status=status
    )
    control.broadcast_once()
    assert status.broadcast_errors == 1
