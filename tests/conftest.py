"""Fixtures for the real-component tests: broker resources of their own and process factories.

Redis tests run on a private `redis-server` started for the session on a free port; each test
gets a database of it (flushed: the server is ours), which isolates pub/sub events too, since
kombu prefixes fanout channels with the database number. RabbitMQ tests share one vhost and user
made for the session (and removed after it) and use a queue name of their own. Nothing is done to
the machine's shared Redis or RabbitMQ beyond that vhost and user.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection

from brokers import RabbitVhost, RedisServer
from log_receivers import HttpReceiver
from support import PRODUCERS, ExporterProcess, WorkerProcess, free_port

AMQP_GUEST = "amqp://guest:guest@127.0.0.1:5672"
_redis_databases = itertools.cycle(range(16))


def _require(url: str, how_to_start: str) -> None:
    try:
        with Connection(url, connect_timeout=3) as connection:
            connection.ensure_connection(max_retries=1)
    except Exception as exc:
        pytest.fail(f"{url} is not reachable ({exc}); start it with: {how_to_start}")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server of the session's own (the machine's 6379 is never touched)."""
    try:
        server = RedisServer()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield server
    server.close()


@pytest.fixture(scope="session")
def rabbit() -> Iterator[RabbitVhost]:
    """A vhost and user made for the session on the machine's RabbitMQ, removed afterwards."""
    _require(f"{AMQP_GUEST}//", "rabbitmq-server -detached")
    try:
        vhost = RabbitVhost()
    except (RuntimeError, subprocess.SubprocessError) as exc:
        pytest.fail(f"cannot create a RabbitMQ vhost for the tests: {exc}")
    yield vhost
    vhost.close()


@pytest.fixture(scope="session")
def rabbit_vhost(rabbit: RabbitVhost) -> str:
    return rabbit.name


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    db = next(_redis_databases)
    redis.Redis(host="127.0.0.1", port=redis_server.port, db=db).flushdb()
    return redis_server.url(db)


@pytest.fixture
def amqp_url(rabbit: RabbitVhost) -> str:
    return rabbit.url()


@pytest.fixture(params=["redis", "amqp"])
def broker_url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture(autouse=True)
def close_producers() -> Iterator[None]:
    """Producer apps hold pooled broker connections: close them with the test that made them."""
    yield
    while PRODUCERS:
        PRODUCERS.pop().close()


@pytest.fixture
def queue() -> str:
    return f"obs_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def start_exporter() -> Iterator[Callable[..., ExporterProcess]]:
    started: list[ExporterProcess] = []

    def start(broker_url: str, *flags: str, healthy: bool = True, **kwargs) -> ExporterProcess:
        if "--event-queue-name" not in flags:
            # The default name is per host and port, kept across restarts: a free port used
            # again in the session must not find an earlier test's queue.
            flags = (*flags, "--event-queue-name", f"celeryev.celery-obs.test-{uuid.uuid4()}")
        if "--event-queue-expires" not in flags:
            # A stopped exporter's queue outlives it (for its restart); in tests, not for long.
            flags = (*flags, "--event-queue-expires", "20")
        exporter = ExporterProcess(
            broker_url, "--worker-timeout", "3", "--queue-poll-interval", "0.5", *flags, **kwargs
        )
        started.append(exporter)
        if healthy:
            exporter.wait_healthy()
        return exporter

    yield start
    for exporter in started:
        exporter.close()


@pytest.fixture
def start_worker() -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(
        broker_url: str, queue: str, name: str = "obs", *flags: str, **kwargs
    ) -> WorkerProcess:
        worker = WorkerProcess(
            broker_url, queue, f"{name}-{uuid.uuid4().hex[:6]}", *flags, **kwargs
        )
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.close()


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA), and its key."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed to make a test certificate")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "server.crt", directory / "server.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture
def receiver() -> Iterator[HttpReceiver]:
    """A stand-in for Logstash's http input on a free port (stop()/start() for outages)."""
    receiver = HttpReceiver(free_port())
    receiver.start()
    yield receiver
    if receiver.server is not None:
        receiver.stop()


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Real log_shipping records (es_mapping_model), made once per module that asks."""
    # Imported here: the model reads the templates at import, which only these tests need.
    from es_mapping_model import lifecycle_records, shipper_reports

    return lifecycle_records() + shipper_reports(tmp_path_factory.mktemp("spool"))
