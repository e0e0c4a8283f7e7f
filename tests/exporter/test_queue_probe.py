"""The queue length probe on real brokers: each queue fails alone, is counted, and a name that
keeps failing stops being probed (the clock is injected; the brokers are real)."""

from __future__ import annotations

import pytest
import redis
from kombu import Connection

from celery_obs.exporter.queues import (
    FAILURES_BEFORE_SUSPEND,
    SUSPEND_FOR,
    QueueLengths,
    QueueProbe,
    declared_lengths,
    length_reader,
)
from celery_obs.exporter.redis_link import settings_for_url

from support import free_port
from test_tracker import Clock

pytestmark = pytest.mark.broker


def test_redis_a_key_that_is_not_a_list_fails_alone_then_is_suspended(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.set("not_a_queue", "x")
    client.rpush("real", "m1", "m2")
    client.rpush("real\x06\x167", "m3")  # a priority sub-list (step 7)
    cache, clock = QueueLengths(), Clock()
    names = {"real", "not_a_queue", "absent"}
    reader = length_reader(lambda: Connection(redis_url), settings_for_url(redis_url, {}))
    probe = QueueProbe(reader, lambda: names, cache, 1.0, monotonic=clock)
    try:
        for attempt in range(1, FAILURES_BEFORE_SUSPEND + 1):
            probe.probe_once()
            assert cache.snapshot() == ({"real": 3, "absent": 0}, attempt)
        probe.probe_once()  # suspended: not probed, not counted again
        assert cache.snapshot() == ({"real": 3, "absent": 0}, FAILURES_BEFORE_SUSPEND)
        client.delete("not_a_queue")
        client.rpush("not_a_queue", "now it is one")
        clock.advance(SUSPEND_FOR)
        probe.probe_once()
        assert cache.snapshot() == (
            {"real": 3, "absent": 0, "not_a_queue": 1},
            FAILURES_BEFORE_SUSPEND,
        )
    finally:
        probe.stop(0)


def test_amqp_names_that_are_no_queue_fail_alone(amqp_url: str, queue: str) -> None:
    with Connection(amqp_url) as connection:
        channel = connection.channel()
        channel.queue_declare(queue=queue, auto_delete=True)
        channel.basic_publish(channel.prepare_message(b"m"), exchange="", routing_key=queue)
        too_long = "q" * 300
        lengths, failures = declared_lengths(
            connection, sorted([queue, too_long, "amq.reserved", "obs_missing"])
        )
        assert lengths == {queue: 1, "obs_missing": 0, "amq.reserved": 0}
        assert list(failures) == [too_long]
        assert "over 255 bytes" in failures[too_long]
        channel.queue_delete(queue)


def test_amqp_the_probe_reaches_the_third_server_of_a_failover_list(
    amqp_url: str, queue: str
) -> None:
    # kombu moves to the next server on each retry: a fixed retry count stopped at the second.
    down = [amqp_url.replace(":5672/", f":{free_port()}/", 1) for _ in range(2)]
    with Connection(amqp_url) as connection:
        channel = connection.channel()
        channel.queue_declare(queue=queue, auto_delete=False)
        channel.basic_publish(channel.prepare_message(b"m"), exchange="", routing_key=queue)
        cache = QueueLengths()
        reader = length_reader(lambda: Connection(";".join([*down, amqp_url])), None)
        probe = QueueProbe(reader, lambda: {queue}, cache, 1.0)
        try:
            probe.probe_once()
            assert cache.snapshot() == ({queue: 1}, 0)
        finally:
            probe.stop(0)
            channel.queue_delete(queue)
