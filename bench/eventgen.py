"""Synthetic Celery event traffic, published straight to the broker's event exchange.

`build_workload()` makes N task lifecycles (task-sent -> received -> started -> succeeded, or
failed / retried-then-succeeded / revoked / rejected by the given ratios) over M workers and K task
names, with a heartbeat from every worker each `heartbeat_every` tasks, and counts what it made
per event type. `encode_*` turn it into wire messages exactly as Celery's event dispatcher sends
them (kombu envelope on Redis, AMQP properties on RabbitMQ), one event per message or task events
batched in lists the way a busy prefork worker flushes `task.multi`. Publishers send those at full
speed or at a fixed rate.

Run it alone to load a broker:  python bench/eventgen.py --broker-url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import socket
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlparse

EXCHANGE = "celeryev"
OUTCOMES = ("retried", "revoked", "rejected", "failed", "succeeded")


@dataclass
class Workload:
    tasks: int = 50_000
    workers: int = 20
    names: int = 50
    queues: int = 4
    fail: float = 0.05
    retry: float = 0.0
    revoke: float = 0.0
    reject: float = 0.0
    batch: int = 1
    heartbeat_every: int = 500
    seed: int = 1
    events: list[dict] = field(default_factory=list)
    expected: Counter = field(default_factory=Counter)


def _event(kind: str, hostname: str, ts: float, **fields: object) -> dict:
    return {
        "hostname": hostname,
        "utcoffset": 0,
        "pid": 4242,
        "clock": 1,
        "type": kind,
        "timestamp": ts,
        **fields,
    }


def build_workload(workload: Workload) -> Workload:
    rng = random.Random(workload.seed)
    workers = [f"bench-{i}@host-{i % 5}" for i in range(workload.workers)]
    names = [f"bench.tasks.task_{i}" for i in range(workload.names)]
    events, now = workload.events, time.time()
    ratios = [workload.retry, workload.revoke, workload.reject, workload.fail]
    if sum(ratios) > 1:
        raise ValueError("retry + revoke + reject + fail ratios must not exceed 1")
    for i in range(workload.tasks):
        if i % workload.heartbeat_every == 0:
            for worker in workers:
                events.append(
                    _event(
                        "worker-heartbeat",
                        worker,
                        now,
                        freq=2.0,
                        active=1,
                        processed=i,
                        loadavg=[0.5, 0.4, 0.3],
                        sw_ident="py-celery",
                        sw_ver="5.7.0",
                        sw_sys="Linux",
                    )
                )
        task_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        # Each task name routes to one queue, as in most clusters.
        name, queue = names[i % len(names)], f"queue_{i % len(names) % workload.queues}"
        worker, t = workers[i % len(workers)], now + i * 0.001
        outcome = rng.choices(OUTCOMES, weights=[*ratios, 1.0 - sum(ratios)])[0]
        attempts = ["retried", "succeeded"] if outcome == "retried" else [outcome]
        for retries, end in enumerate(attempts):
            t += retries * 0.1
            sent = dict(
                uuid=task_id,
                name=name,
                args="(1, 2)",
                kwargs="{}",
                retries=retries,
                eta=None,
                expires=None,
                root_id=task_id,
                parent_id=None,
            )
            events.append(
                _event(
                    "task-sent",
                    "producer@app-1",
                    t,
                    queue=queue,
                    exchange="",
                    routing_key=queue,
                    **sent,
                )
            )
            events.append(_event("task-received", worker, t + 0.002, **sent))
            if end == "revoked":
                events.append(
                    _event(
                        "task-revoked",
                        worker,
                        t + 0.003,
                        uuid=task_id,
                        terminated=False,
                        signum=None,
                        expired=False,
                    )
                )
                continue
            events.append(_event("task-started", worker, t + 0.003, uuid=task_id))
            done = t + 0.02
            if end == "retried":
                events.append(
                    _event(
                        "task-retried",
                        worker,
                        done,
                        uuid=task_id,
                        exception="ConnectionError('busy')",
                        traceback="Tb",
                    )
                )
            elif end == "rejected":
                events.append(_event("task-rejected", worker, done, uuid=task_id, requeue=False))
            elif end == "failed":
                exc = ("ValueError('bad input')", "KeyError('missing')")[i % 2]
                events.append(
                    _event(
                        "task-failed",
                        worker,
                        done,
                        uuid=task_id,
                        exception=exc,
                        traceback="Traceback ...",
                    )
                )
            else:
                events.append(
                    _event("task-succeeded", worker, done, uuid=task_id, result="3", runtime=0.017)
                )
    workload.expected = Counter(event["type"] for event in events)
    return workload


def messages(workload: Workload) -> Iterator[tuple[str, object]]:
    """(routing key, body) pairs: task events in lists of `batch`, heartbeats alone."""
    pending: list[dict] = []
    for event in workload.events:
        if workload.batch > 1 and event["type"].startswith("task-"):
            pending.append(event)
            if len(pending) == workload.batch:
                yield "task.multi", pending
                pending = []
        else:
            yield event["type"].replace("-", "."), event
    if pending:
        yield "task.multi", pending


def encode_redis(workload: Workload, db: int) -> list[tuple[bytes, bytes]]:
    """(channel, payload) as kombu's Redis transport publishes a fanout message."""
    out = []
    for routing_key, body in messages(workload):
        envelope = {
            "body": base64.b64encode(json.dumps(body).encode()).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {"hostname": "bench@generator"},
            "properties": {
                "delivery_mode": 1,
                "delivery_info": {"exchange": EXCHANGE, "routing_key": routing_key},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
        channel = f"/{db}.{EXCHANGE}/{routing_key}".encode()
        out.append((channel, json.dumps(envelope).encode()))
    return out


def encode_amqp(workload: Workload) -> list[tuple[str, bytes]]:
    return [(key, json.dumps(body).encode()) for key, body in messages(workload)]


class _Closing:
    """Publishers own a broker connection: use them in a `with` block, or close() them."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RedisPublisher(_Closing):
    def __init__(self, url: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url)

    def publish(
        self, wire: Sequence[tuple[bytes, bytes]], rate: float = 0, chunk: int = 200
    ) -> None:
        _paced(wire, rate, chunk, self._send)

    def _send(self, part: Sequence[tuple[bytes, bytes]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for channel, payload in part:
            pipe.publish(channel, payload)
        pipe.execute()

    def close(self) -> None:
        self.client.close()


class AmqpPublisher(_Closing):
    def __init__(self, url: str) -> None:
        import amqp

        parsed = urlparse(url)
        self.connection = amqp.Connection(
            f"{parsed.hostname}:{parsed.port or 5672}",
            userid=parsed.username or "guest",
            password=parsed.password or "guest",
            virtual_host=parsed.path[1:] or "/",
            # py-amqp sets TCP_USER_TIMEOUT to 1 s: while RabbitMQ's flow control holds a fast
            # publisher back for longer, the kernel aborts the connection ("basic_publish: timed
            # out", errno 110). Held back is what a worker would be too; wait as it would.
            socket_settings={socket.TCP_USER_TIMEOUT: 60_000},
        )
        self.connection.connect()
        self.channel = self.connection.channel()
        self.channel.exchange_declare(EXCHANGE, "topic", durable=True, auto_delete=False)

    def publish(self, wire: Sequence[tuple[str, bytes]], rate: float = 0, chunk: int = 50) -> None:
        _paced(wire, rate, chunk, self._send)

    def close(self) -> None:
        self.connection.close()

    def _send(self, part: Sequence[tuple[str, bytes]]) -> None:
        import amqp

        for routing_key, body in part:
            message = amqp.Message(
                body,
                content_type="application/json",
                content_encoding="utf-8",
                delivery_mode=1,
                application_headers={"hostname": "bench@generator"},
            )
            self.channel.basic_publish(message, exchange=EXCHANGE, routing_key=routing_key)


def _paced(wire: Sequence, rate: float, chunk: int, send) -> None:
    """Send in chunks; with `rate` (messages/s) sleep to hold that pace, else full speed.

    Paced, a chunk is what arrives in about a millisecond: workers send events as tasks run,
    one message at a time, so a live stream reaches the exporter in small pieces, not in the
    bursts a pipeline of hundreds would make."""
    if rate:
        chunk = max(1, min(chunk, round(rate / 1000)))
    start = time.perf_counter()
    for offset in range(0, len(wire), chunk):
        send(wire[offset : offset + chunk])
        if rate:
            ahead = (offset + chunk) / rate - (time.perf_counter() - start)
            if ahead > 0:
                time.sleep(ahead)


def publisher_for(url: str):
    return AmqpPublisher(url) if url.startswith(("amqp", "pyamqp")) else RedisPublisher(url)


def encode_for(url: str, workload: Workload) -> list:
    if url.startswith(("amqp", "pyamqp")):
        return encode_amqp(workload)
    return encode_redis(workload, int(urlparse(url).path.strip("/") or 0))


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tasks", type=int, default=50_000, help="task lifecycles (about 4 events each)"
    )
    parser.add_argument("--workers", type=int, default=20)
    parser.add_argument("--names", type=int, default=50, help="distinct task names")
    parser.add_argument("--fail", type=float, default=0.05, help="ratio of failed tasks")
    parser.add_argument(
        "--retry", type=float, default=0.0, help="ratio retried once, then succeeded"
    )
    parser.add_argument("--revoke", type=float, default=0.0, help="ratio revoked")
    parser.add_argument("--reject", type=float, default=0.0, help="ratio rejected")
    parser.add_argument(
        "--batch", type=int, default=1, help="task events per message (24 ~ busy prefork)"
    )
    parser.add_argument("--seed", type=int, default=1)


def workload_from(args: argparse.Namespace) -> Workload:
    return build_workload(
        Workload(
            tasks=args.tasks,
            workers=args.workers,
            names=args.names,
            fail=args.fail,
            retry=args.retry,
            revoke=args.revoke,
            reject=args.reject,
            batch=args.batch,
            seed=args.seed,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--rate", type=float, default=0, help="messages/s (0: full speed)")
    add_workload_arguments(parser)
    args = parser.parse_args()
    workload = workload_from(args)
    wire = encode_for(args.broker_url, workload)
    started = time.perf_counter()
    publisher_for(args.broker_url).publish(wire, args.rate)
    took = time.perf_counter() - started
    print(
        f"published {len(workload.events)} events in {len(wire)} messages in {took:.2f}s "
        f"({len(workload.events) / took:,.0f} events/s) from {socket.gethostname()}"
    )
    print(json.dumps(dict(sorted(workload.expected.items()))))


if __name__ == "__main__":
    main()
