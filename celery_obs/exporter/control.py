"""Remote-control broadcasts to the cluster's workers, from a background thread.

Workers started without `-E` send no task events; like Flower, the exporter periodically
broadcasts `enable_events` so such clusters still report. After each (re)connect it also
broadcasts `heartbeat` so every worker announces itself at once instead of within its next
heartbeat interval (celery's own `Receiver.wakeup_workers` does the same).

On Redis the broadcast is published over the exporter's own link, as kombu publishes it (the
same envelope on the same channel, which a test compares with kombu's): through Celery's app it
would load kombu's Redis transport and redis-py (~10 MB) for two messages a minute. On RabbitMQ
and kombu's other transports it is published with kombu's Producer, as kombu's pidbox Mailbox
publishes it for Celery (a test compares the two): Celery's app would cost ~4 MB more.
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable

from kombu import Connection, Exchange, Producer

from . import redis_link
from .consumer import BrokerStatus
from .outages import OutageLog
from .redis_link import RedisSettings
from .transports import CONTROL_EXCHANGE, connect_once

log = logging.getLogger(__name__)

#: How long a broadcast stays valid, as Celery's `control.broadcast` sets it (its `timeout`).
BROADCAST_TTL = 1.0


def pidbox_body(command: str) -> dict[str, object]:
    """What kombu's Mailbox publishes for a broadcast of `command` to every worker."""
    return {
        "method": command,
        "arguments": {},
        "destination": None,
        "pattern": None,
        "matcher": None,
    }


def pidbox_message(command: str, clock: int, now: float) -> bytes:
    """A broadcast of `command` to every worker, in the envelope kombu's Redis transport
    publishes (kombu.pidbox.Mailbox._publish through a virtual channel)."""
    envelope = {
        "body": base64.b64encode(json.dumps(pidbox_body(command)).encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"clock": clock, "expires": now + BROADCAST_TTL},
        "properties": {
            "delivery_mode": 2,
            "delivery_info": {"exchange": CONTROL_EXCHANGE, "routing_key": ""},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return json.dumps(envelope).encode()


class RedisBroadcaster:
    """Publishes broadcasts on a link opened for each round (one or two messages a minute)."""

    def __init__(self, settings: RedisSettings, clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._clock = clock
        self._lamport = itertools.count(1)  # kombu's pidbox clock: workers only move theirs on

    def broadcast(self, commands: list[str]) -> None:
        sock, reached = redis_link.connect_any(self._settings, timeout=5.0)
        try:
            publish = []
            for command in commands:
                message = pidbox_message(command, next(self._lamport), self._clock())
                for channel in reached.control_channels:
                    publish.append(redis_link.command("PUBLISH", channel, message))
            for reply in redis_link.request(sock, publish):
                if isinstance(reply, Exception):
                    raise redis_link.RedisRefused(f"Redis refused PUBLISH: {reply}")
        finally:
            sock.close()

    def close(self) -> None:
        """Nothing stays open between rounds."""


class KombuBroadcaster:
    """Publishes broadcasts with kombu's Producer on a connection opened for each round (RabbitMQ
    and kombu's other transports): the exchange, body, headers and serializer of kombu's pidbox
    Mailbox, as Celery's `app.control.broadcast` configures it.

    `connect` makes the round's connection: the exporter's own, with read and write timeouts,
    so a broker that stops answering (or stops reading, as RabbitMQ does to publishers under a
    memory alarm) fails the round instead of holding this thread."""

    def __init__(
        self, connect: Callable[[], Connection], clock: Callable[[], float] = time.time
    ) -> None:
        self._connect = connect
        self._clock = clock
        self._lamport = itertools.count(1)  # the Mailbox's own clock, as for Redis
        # kombu.pidbox.Mailbox._get_exchange("celery", "fanout"), declared by every worker.
        self._exchange = Exchange(
            CONTROL_EXCHANGE, type="fanout", durable=False, delivery_mode="transient"
        )

    def broadcast(self, commands: list[str]) -> None:
        connection = self._connect()
        try:
            # Each server once a round: the next round (or a reconnect's poke) tries again, and
            # a broker that is down must not hold this thread in kombu's retry loop.
            connect_once(connection)
            producer = Producer(connection.default_channel, auto_declare=False)
            for command in commands:
                producer.publish(
                    pidbox_body(command),
                    exchange=self._exchange.name,
                    declare=[self._exchange],
                    headers={
                        "clock": next(self._lamport),
                        "expires": self._clock() + BROADCAST_TTL,
                    },
                    serializer="json",
                )
        finally:
            connection.release()

    def close(self) -> None:
        """Nothing stays open between rounds."""


class WorkerControl:
    def __init__(
        self,
        connect: Callable[[], Connection],
        enable_events: bool,
        interval: float,
        redis: RedisSettings | None = None,
        status: BrokerStatus | None = None,
    ) -> None:
        #: Where failed broadcast rounds are counted (a self-metric).
        self._status = status or BrokerStatus()
        self._outage = OutageLog(
            log, "broadcast of heartbeat" + (" and enable_events" if enable_events else "")
        )
        self._broadcaster: RedisBroadcaster | KombuBroadcaster = (
            RedisBroadcaster(redis) if redis is not None else KombuBroadcaster(connect)
        )
        self._enable_events = enable_events
        self._interval = interval
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)

    def poke(self) -> None:
        """Broadcast now (called when the event consumer has just connected)."""
        self._wake.set()

    def broadcast_once(self) -> None:
        commands = ["heartbeat"] + (["enable_events"] if self._enable_events else [])
        try:
            self._broadcaster.broadcast(commands)
        except Exception as exc:  # a broker hiccup here must not stop the exporter
            self._status.broadcast_errors += 1
            self._outage.failed(exc)
        else:
            self._outage.succeeded()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self._interval)
            if self._stopping.is_set():
                break
            self._wake.clear()
            self.broadcast_once()
        self._broadcaster.close()
