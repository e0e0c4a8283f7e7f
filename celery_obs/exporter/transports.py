"""Which of kombu's transports a connection uses, without importing the transport's module.

kombu loads a transport's module the first time `connection.transport` is read, and its Redis
module imports redis-py: about 10 MB of resident memory (16 MB where redis-py also finds
OpenTelemetry) that the exporter never uses on Redis, since it reads, probes and broadcasts
over its own socket (redis_link). So the driver type is read from kombu's alias table for the
transports the exporter knows, and from the transport itself only for any other.
"""

from __future__ import annotations

from kombu import Connection
from kombu.transport import TRANSPORT_ALIASES

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
