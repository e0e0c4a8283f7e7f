"""The exporter's reading of kombu transports, held to kombu's and Celery's own."""

from __future__ import annotations

import pytest
from celery.events.event import get_exchange
from kombu import Connection

from celery_obs.exporter.transports import driver_of, event_exchange


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:1/0",
        "rediss://127.0.0.1:1/0?ssl_cert_reqs=none",
        "sentinel://127.0.0.1:1/0",
        "amqp://guest:guest@127.0.0.1:1//",
        "pyamqp://guest:guest@127.0.0.1:1//",
        "memory://",
    ],
)
def test_the_event_exchange_is_the_one_celery_declares(url: str) -> None:
    # Nothing connects (port 1, in case): kombu's Connection is lazy, and get_exchange only
    # reads the transport.
    ours, celerys = event_exchange(Connection(url)), get_exchange(Connection(url))
    assert (ours.name, ours.type) == (celerys.name, celerys.type)
    assert ours.type == ("fanout" if driver_of(Connection(url)) == "redis" else "topic")
