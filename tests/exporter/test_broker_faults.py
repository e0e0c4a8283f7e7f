"""Brokers that lie, stall and refuse, with the exporter's health and counts checked through it.

RabbitMQ through a TCP proxy that stalls and cuts the link, an exporter killed and restarted,
a private redis-server stopped with SIGSTOP, and a Redis user whose ACL forbids subscribing.
Counts are exact: the traffic comes from the benchmark's generator (bench/eventgen.py).
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from kombu import Connection

from brokers import RabbitVhost, RedisServer
from support import ExporterProcess, free_port, wait_for
from tcp_proxy import TcpProxy
from test_event_stream import eventgen, list_queues, wait_subscribed

pytestmark = [pytest.mark.broker, pytest.mark.slow]

TASK_KINDS = ("sent", "received", "started", "succeeded", "failed", "retried")


def workload(tasks: int, seed: int) -> eventgen.Workload:
    return eventgen.build_workload(
        eventgen.Workload(
            tasks=tasks, workers=3, names=5, fail=0.1, retry=0.1, heartbeat_every=50, seed=seed
        )
    )


def task_counts(exporter: ExporterProcess) -> dict[str, int]:
    scrape = exporter.scrape()
    return {
        f"task-{kind}": int(sum(scrape.samples.get(f"celery_task_{kind}_total", {}).values()))
        for kind in TASK_KINDS
    }


def expected_counts(*workloads: eventgen.Workload) -> dict[str, int]:
    return {
        f"task-{kind}": sum(w.expected[f"task-{kind}"] for w in workloads) for kind in TASK_KINDS
    }


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    proxy = TcpProxy(5672)
    yield proxy
    proxy.close()


def test_a_stalled_and_cut_amqp_link_loses_nothing(
    amqp_url: str, proxy: TcpProxy, start_exporter, request: pytest.FixtureRequest
) -> None:
    exporter = start_exporter(proxy.url_for(amqp_url), "--no-enable-events")
    wait_subscribed(exporter, amqp_url)  # the probes go straight to RabbitMQ
    publisher = eventgen.publisher_for(amqp_url)
    request.addfinalizer(publisher.close)
    before, during = workload(300, seed=1), workload(700, seed=2)
    publisher.publish(eventgen.encode_for(amqp_url, before))
    wait_for(lambda: task_counts(exporter) == expected_counts(before), 30, "the first part")

    proxy.stall()  # the link goes dark mid-stream: RabbitMQ keeps pushing into it
    publisher.publish(eventgen.encode_for(amqp_url, during))
    # Deliveries are in flight in the stalled link (the queue does not hold them all): they
    # were sent to a consumer that will never acknowledge them.
    messages = len(eventgen.encode_for(amqp_url, during))
    wait_for(
        lambda: ready_in_queue(amqp_url, exporter) < messages,
        30,
        "deliveries pushed into the stalled link",
    )
    proxy.cut(reset=True)  # and then it dies
    proxy.resume()

    wait_for(
        lambda: task_counts(exporter) == expected_counts(before, during),
        60,
        "every event of the stalled part counted after the reconnect",
    )
    scrape = exporter.scrape()
    assert scrape.value("celery_exporter_broker_reconnects_total") >= 1
    assert scrape.samples.get("celery_exporter_malformed_events_total", {}) == {}


def test_the_event_stream_reaches_the_third_server_of_a_failover_list(
    amqp_url: str, start_exporter
) -> None:
    # kombu moves to the next server on each retry: a fixed retry count never got past the
    # second, and the exporter stayed disconnected with a broker up third in the list.
    down = [amqp_url.replace(":5672/", f":{free_port()}/", 1) for _ in range(2)]
    exporter = start_exporter(";".join([*down, amqp_url]), "--no-enable-events")
    wait_subscribed(exporter, amqp_url)
    assert exporter.scrape().value("celery_exporter_broker_connected") == 1


def ready_in_queue(amqp_url: str, exporter: ExporterProcess) -> int:
    """Messages ready in the exporter's queue (not yet delivered to it)."""
    name = exporter.args[exporter.args.index("--event-queue-name") + 1]
    with Connection(amqp_url) as connection:
        return connection.channel().queue_declare(queue=name, passive=True).message_count


def test_an_exporter_restart_finds_its_queue_and_every_event_published_meanwhile(
    amqp_url: str, rabbit: RabbitVhost, start_exporter
) -> None:
    name = f"celeryev.celery-obs.restart-{uuid.uuid4().hex[:8]}"
    flags = ("--no-enable-events", "--event-queue-name", name, "--event-queue-expires", "60")
    first = start_exporter(amqp_url, *flags)
    wait_subscribed(first, amqp_url)
    first.signal(signal.SIGKILL)  # a crash: nothing cleaned up
    first.wait(10)

    meanwhile = workload(500, seed=3)
    with eventgen.publisher_for(amqp_url) as publisher:
        publisher.publish(eventgen.encode_for(amqp_url, meanwhile))
    second = start_exporter(amqp_url, *flags)
    wait_for(
        lambda: task_counts(second) == expected_counts(meanwhile),
        60,
        "the events published while no exporter ran",
    )
    ours = [q for q in list_queues(rabbit.name) if q.startswith("celeryev.celery-obs.restart-")]
    assert ours == [name]  # one queue for the instance, no orphan per process


def test_a_stalled_redis_is_reported_within_ten_seconds(start_exporter) -> None:
    server = RedisServer()
    try:
        exporter = start_exporter(server.url(), "--no-enable-events")
        exporter.wait_healthy()
        assert server.process is not None
        server.process.signal(signal.SIGSTOP)  # the process hangs; its sockets stay open
        stalled_at = time.monotonic()
        wait_for(lambda: exporter.healthz()[0] == 503, 10, "/healthz 503 within 10 s")
        took = time.monotonic() - stalled_at
        server.process.signal(signal.SIGCONT)
        exporter.wait_healthy(30)
        assert exporter.scrape().value("celery_exporter_broker_reconnects_total") == 1
        print(f"\nstalled Redis reported after {took:.1f} s")
    finally:
        if server.process is not None:
            server.process.signal(signal.SIGCONT)
        server.close()


def test_a_redis_user_who_may_not_subscribe_is_unhealthy_with_redis_reason(
    start_exporter,
) -> None:
    server = RedisServer()
    password = f"pw-{uuid.uuid4().hex}"
    try:
        redis.Redis(port=server.port).acl_setuser(
            "obs",
            enabled=True,
            passwords=[f"+{password}"],
            keys=["*"],
            channels=["*"],
            commands=["+@all", "-psubscribe", "-subscribe"],
        )
        url = f"redis://obs:{password}@127.0.0.1:{server.port}/0"
        exporter = start_exporter(url, "--no-enable-events", "--log-level", "debug", healthy=False)

        def refused() -> str | None:
            status, reason = exporter.healthz()
            return reason if status == 503 and "NOPERM" in reason else None

        reason = wait_for(refused, 30, "/healthz naming Redis' refusal")
        assert "psubscribe" in reason.lower()
        assert exporter.scrape().value("celery_exporter_broker_connected") == 0
        # Said once, however often it is retried (the retries are logged at debug level).
        wait_for(
            lambda: exporter.output().count("still cannot connect") >= 2,
            30,
            "two more attempts",
        )
        output = exporter.output()
        said = [line for line in output.splitlines() if "cannot connect to the broker" in line]
        assert len([line for line in said if "still" not in line]) == 1
        assert password not in output
    finally:
        server.close()


def test_failover_and_sentinel_urls_start_and_never_show_a_password(start_exporter) -> None:
    first, second = f"pw1-{uuid.uuid4().hex}", f"pw2-{uuid.uuid4().hex}"
    server = RedisServer("--requirepass", first)
    try:
        failover = f"redis://:{first}@127.0.0.1:{server.port}/0;redis://:{second}@127.0.0.1:1/0"
        exporter = start_exporter(failover, "--log-level", "debug")
        status, reason = exporter.healthz()
        assert (status, reason) == (
            200,
            f"ok: connected to redis://:**@127.0.0.1:{server.port}/0;redis://:**@127.0.0.1:1/0,"
            " consuming events\n",
        )
        # Sentinels that do not answer: it starts, says why it is not ready, shows no password.
        sentinel = start_exporter(
            f"sentinel://:{first}@127.0.0.1:1;sentinel://:{second}@127.0.0.1:2",
            "--broker-transport-option",
            "master_name=mymaster",
            "--broker-transport-option",
            f'sentinel_kwargs={{"password": "{second}"}}',
            healthy=False,
        )
        reason = wait_for(
            lambda: (lambda r: r[1] if r[0] == 503 and ": " in r[1] else None)(sentinel.healthz()),
            60,
            "/healthz giving the sentinel failure",
        )
        assert reason.startswith("not connected to sentinel://:**@127.0.0.1:1;sentinel://:**@")
        for process in (exporter, sentinel):
            assert process.proc.poll() is None  # running, not crashed
            output = process.output() + process.scrape().text
            assert first not in output
            assert second not in output
    finally:
        server.close()
