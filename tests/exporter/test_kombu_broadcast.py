"""The exporter's broadcasts on RabbitMQ, held to what Celery's `app.control.broadcast` sends."""

from __future__ import annotations

import json
import threading

from celery import Celery
from kombu import Connection, Exchange, Queue

from celery_obs.exporter.config import ExporterConfig
from celery_obs.exporter.consumer import BrokerStatus
from celery_obs.exporter.control import KombuBroadcaster, WorkerControl
from celery_obs.exporter.service import Exporter

from brokers import RabbitVhost
from support import free_port, wait_for
from tcp_proxy import TcpProxy


def test_a_rabbitmq_broadcast_is_celerys_own(rabbit: RabbitVhost) -> None:
    url = rabbit.url()
    with Connection(url) as connection:
        heard = listening(connection)
        app = Celery(broker=url, set_as_current=False)
        app.control.broadcast("enable_events")
        app.close()
        KombuBroadcaster(lambda: Connection(url), clock=lambda: 1000.0).broadcast(["enable_events"])
        theirs, ours = (
            wait_for(lambda: heard.get(no_ack=True), 10, "a broadcast") for _ in range(2)
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
    # A wrong password is not retried: the round fails at once, and is counted.
    status = BrokerStatus()
    control = WorkerControl(
        lambda: Connection(rabbit.url(password="wrong")),
        enable_events=True,
        interval=3600,
        status=status,
    )
    control.broadcast_once()
    assert status.broadcast_errors == 1


def listening(connection: Connection) -> Queue:
    """A queue of the test's own on the vhost, hearing every broadcast as a worker does."""
    exchange = Exchange("celery.pidbox", type="fanout", durable=False, delivery_mode=1)
    heard = Queue("obs-test-pidbox", exchange, exclusive=True)(connection.default_channel)
    heard.declare()
    return heard


def test_a_broadcast_tries_every_server_of_a_failover_list(rabbit: RabbitVhost) -> None:
    # kombu moves to the next server on each retry: a fixed retry count stopped at the second.
    good = rabbit.url()
    down = [good.replace(":5672/", f":{free_port()}/", 1) for _ in range(2)]
    status = BrokerStatus()
    control = WorkerControl(
        lambda: Connection(";".join([*down, good])),
        enable_events=True,
        interval=3600,
        status=status,
    )
    with Connection(good) as connection:
        heard = listening(connection)
        control.broadcast_once()
        methods = [
            json.loads(wait_for(lambda: heard.get(no_ack=True), 10, "a broadcast").body)["method"]
            for _ in range(2)
        ]
    assert (status.broadcast_errors, methods) == (0, ["heartbeat", "enable_events"])


def test_a_broadcast_goes_on_past_a_server_that_refuses_the_login(rabbit: RabbitVhost) -> None:
    # kombu fails over only on errors it deems recoverable: a refused login ended the round.
    status = BrokerStatus()
    control = WorkerControl(
        lambda: Connection(f"{rabbit.url(password='wrong')};{rabbit.url()}"),
        enable_events=True,
        interval=3600,
        status=status,
    )
    with Connection(rabbit.url()) as connection:
        heard = listening(connection)
        control.broadcast_once()
        assert wait_for(lambda: heard.get(no_ack=True), 10, "a broadcast") is not None
    assert status.broadcast_errors == 0


def test_a_broker_that_stops_answering_fails_the_round(rabbit: RabbitVhost) -> None:
    # Logged in, then silence (or RabbitMQ no longer reading from a publisher, as under a
    # memory alarm): the round's connection has read and write timeouts, so the round fails
    # and is counted instead of holding the thread. (The exporter's connections have 10 s.)
    proxy = TcpProxy(5672)
    try:

        def connect() -> Connection:
            connection = Connection(
                proxy.url_for(rabbit.url()),
                transport_options={"read_timeout": 1, "write_timeout": 1},
                heartbeat=0,
            )
            connection.ensure_connection(max_retries=0)
            proxy.stall()
            return connection

        status = BrokerStatus()
        control = WorkerControl(connect, enable_events=True, interval=3600, status=status)
        round_ = threading.Thread(target=control.broadcast_once, daemon=True)
        round_.start()
        round_.join(30)
        assert not round_.is_alive()
        assert status.broadcast_errors == 1
    finally:
        proxy.close()


def test_the_exporter_broadcasts_on_connections_with_timeouts(rabbit: RabbitVhost, monkeypatch):
    # The rounds use the exporter's own connections (10 s read and write timeouts, no AMQP
    # heartbeat: nothing is kept open between rounds), not bare ones that can wait forever.
    made: list[Connection] = []
    connect = Exporter.connect_without_heartbeat

    def recorded(self: Exporter) -> Connection:
        made.append(connect(self))
        return made[-1]

    monkeypatch.setattr(Exporter, "connect_without_heartbeat", recorded)
    exporter = Exporter(ExporterConfig(broker_url=rabbit.url(), listen_address="127.0.0.1:0"))
    try:
        exporter.control.broadcast_once()  # nothing started: only the listening socket to close
    finally:
        exporter.server.server_close()
    assert exporter.status.broadcast_errors == 0
    assert len(made) == 1
    options = made[0].transport_options
    assert (options["read_timeout"], options["write_timeout"]) == (10.0, 10.0)
