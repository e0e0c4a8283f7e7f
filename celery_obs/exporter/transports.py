"""Which of kombu's transports a connection uses, without importing the transport's module;
and the exchanges Celery uses on it, without importing Celery.

kombu loads a transport's module the first time `connection.transport` is read, and its Redis
module imports redis-py: about 10 MB of resident memory (16 MB where redis-py also finds
OpenTelemetry) that the exporter never uses on Redis, since it reads, probes and broadcasts
over its own socket (redis_link). So the driver type is read from kombu's alias table for the
transports the exporter knows, and from the transport itself only for any other.
"""

from __future__ import annotations

from kombu import Connection, Exchange
from kombu.transport import TRANSPORT_ALIASES

#: The exchange Celery publishes events to (celery.events.event.EVENT_EXCHANGE_NAME).
EVENT_EXCHANGE = "celeryev"
#: The exchange of Celery's remote control (its default `control_exchange` plus ".pidbox").
CONTROL_EXCHANGE = "celery.pidbox"
#: Transports on which Celery declares it as a fanout exchange instead of a topic one.
_FANOUT_DRIVERS = frozenset({"redis", "gcpubsub"})

#: kombu's transport modules whose driver type the exporter knows without importing them.
_DRIVERS = {"kombu.transport.redis": "redis", "kombu.transport.pyamqp": "amqp"}


def driver_of(connection: Connection) -> str:
    """kombu's `driver_type` of the connection's transport: "redis", "amqp", "memory", ..."""
    alias = connection.transport_cls
    known = driver_of_alias(alias) if isinstance(alias, str) else None
    return known or str(connection.transport.driver_type)


def driver_of_alias(alias: str) -> str | None:
    """The driver type of a URL scheme naming one of kombu's Redis or AMQP transports."""
    return _DRIVERS.get(TRANSPORT_ALIASES.get(alias, "").partition(":")[0])


def connect_once(connection: Connection) -> None:
    """Connect, trying each server of a failover list (`amqp://a;amqp://b;amqp://c`) once, in
    order, without sleeping; the last server's error is raised. kombu's own retries stopped
    short: a fixed `max_retries` never reached a list's third server, and a server that
    refuses the login (a wrong password or a missing vhost on that one) ended the attempt
    without trying the next. Waiting between attempts is the caller's (its backoff)."""
    servers = max(len(connection.alt), 1)
    for server in range(servers):
        try:
            connection.ensure_connection(max_retries=0)
            return
        except Exception:
            if server == servers - 1:
                raise
            connection.maybe_switch_next()


def event_exchange(connection: Connection) -> Exchange:
    """The event exchange as Celery's `celery.events.event.get_exchange` declares it for this
    connection (a test holds the two together). Importing celery.events for it would load
    Celery's app machinery, ~5 MB of resident memory the exporter has no other use for."""
    kind = "fanout" if driver_of(connection) in _FANOUT_DRIVERS else "topic"
    return Exchange(EVENT_EXCHANGE, type=kind)
