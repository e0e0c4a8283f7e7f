"""Record real Celery event streams for the replay tests (tests/test_recorded_streams.py).

    python tests/record_streams.py                 # every workload on both brokers
    python tests/record_streams.py --broker redis --workload retries

For each broker it starts what it owns (a private redis-server, or a RabbitMQ vhost and user of
its own), a real prefork worker (`-c 2`) and a real threads worker on the same queue, subscribes
to the event exchange, runs the workload, stops the workers warmly and writes every message of
the stream, in arrival order, to `tests/streams/<workload>-<broker>.jsonl`: one line per message,
the decoded body (one event, or the list of a `task.multi` batch) exactly as the worker sent it.
Recording stops once every task reached a final state and every worker said `worker-offline`
(its last event: whatever the worker buffered was sent before it).

The streams are committed: re-record after a Celery upgrade and look at the diff.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from celery import Celery, chain, group
from celery.events.event import get_exchange
from kombu import Connection, Consumer, Queue

sys.path.insert(0, str(Path(__file__).resolve().parent))
from brokers import RabbitVhost, RedisServer
from support import WorkerProcess, producer

STREAMS = Path(__file__).resolve().parent / "streams"
FINAL = frozenset({"task-succeeded", "task-failed", "task-revoked"})


def is_final(event: dict[str, Any]) -> bool:
    """Nothing more will happen to this task (Celery < 5.5 reports a Reject(requeue=False)
    as rejected only, not also as failed)."""
    kind = event["type"]
    return kind in FINAL or (kind == "task-rejected" and not event.get("requeue"))


Send = Callable[[Celery], int]  # publishes part of a workload; returns how many tasks it makes


def _calls(name: str, count: int, *args: Any, **options: Any) -> Send:
    def send(app: Celery) -> int:
        for _ in range(count):
            app.send_task(name, args, **options)
        return count

    return send


def _canvas(app: Celery) -> int:
    add = app.signature
    group(add("obs.add", (i, i)) for i in range(3)).apply_async()
    chain(add("obs.add", (1, 1)), add("obs.add", (2,)), add("obs.add", (3,))).apply_async()
    return 6


def _redeliveries(app: Celery) -> int:
    prefork = f"{app.conf.task_default_queue}_prefork"
    markers = tempfile.mkdtemp(prefix="celery-obs-markers-")
    for i in range(2):
        app.send_task("obs.requeue_once", (f"{markers}/requeue-{i}",))
        app.send_task(
            "obs.time_limit_requeue", (f"{markers}/limit-{i}",), queue=prefork
        )  # time limits need prefork
        app.send_task("obs.replaced")
        app.send_task("obs.retry_elsewhere", (prefork,))
    return 8


#: Workload name -> the sends that make it, all at once (concurrency is part of the shape).
WORKLOADS: dict[str, list[Send]] = {
    # The retry shapes that lost task-started events before attempts were placed by timestamp.
    "retries": [
        _calls("obs.autoretry", 5, 2),  # autoretry_for + backoff: 3 attempts each
        _calls("obs.retry_countdown", 5, 1, 1.0),  # self.retry(countdown=1): 2 attempts each
        _calls("obs.retry_exhaust", 4, 0.2),  # max_retries=2 exhausted: 3 attempts, then failed
        _calls("obs.retry_countdown", 5, 3, 0),  # countdown=0 during the burst: 4 attempts each
        _calls("obs.add", 100, 1, 1),  # the burst
        _calls("obs.retry_pow2", 4, 3),  # countdown 1, 2, 4 s: 4 attempts each
    ],
    # Every other lifecycle a worker produces: failures, time limit, reject, unknown, ETA, canvas.
    "lifecycles": [
        _calls("obs.add", 3, 1, 2),
        _calls("obs.fail_value", 2),
        _calls("obs.fail_payment", 1),
        _calls("obs.sleep", 1, 30),  # hard time limit (1 s) on the prefork worker
        _calls("obs.reject", 1),
        _calls("obs.no_such_task", 1),
        _calls("obs.add", 2, 5, 5, countdown=1.5),
        _canvas,
    ],
    # The same attempt delivered again, or the same id sent again: Reject(requeue=True), a
    # hard time limit under acks_late, Task.replace(), and a retry sent to another queue.
    "redeliveries": [_redeliveries],
}
#: Workloads whose every task ends in a success, after failures and rejections along the way.
SUCCEED_IN_THE_END = frozenset({"redeliveries"})


class StreamRecorder:
    """Every message on the event exchange, in arrival order, on a queue of our own."""

    def __init__(self, url: str) -> None:
        self.connection = Connection(url)
        self.messages: list[Any] = []
        self.events: list[dict[str, Any]] = []
        queue = Queue(
            f"celeryev.record.{uuid.uuid4().hex}",
            exchange=get_exchange(self.connection),
            routing_key="#",
            durable=False,
            auto_delete=True,
        )
        self.consumer = Consumer(
            self.connection.channel(), queues=[queue], on_message=self._on_message, no_ack=True
        )
        self.consumer.consume()

    def _on_message(self, message: Any) -> None:
        body = json.loads(message.body)
        self.messages.append(body)
        self.events.extend(body if isinstance(body, list) else [body])

    def pump_until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
            with suppress(TimeoutError):  # a quiet half second
                self.connection.drain_events(timeout=0.5)

    def seen(self, kind: str, hostname: str) -> bool:
        return any(e["type"] == kind and e.get("hostname") == hostname for e in self.events)

    def finished_tasks(self, succeeded_only: bool = False) -> int:
        if succeeded_only:  # redelivered tasks fail or reject before they succeed
            return sum(e["type"] == "task-succeeded" for e in self.events)
        return len({e["uuid"] for e in self.events if is_final(e)})

    def close(self) -> None:
        self.consumer.cancel()
        self.connection.release()


@contextmanager
def broker(kind: str) -> Iterator[str]:
    if kind == "redis":
        server = RedisServer()
        try:
            yield server.url()
        finally:
            server.close()
    else:
        vhost = RabbitVhost()
        try:
            yield vhost.url()
        finally:
            vhost.close()


def record(kind: str, workload: str) -> Path:
    queue = f"rec_{uuid.uuid4().hex[:6]}"
    with broker(kind) as url:
        recorder = StreamRecorder(url)
        workers = [
            # The prefork worker also takes the queue only it serves (time limits need prefork).
            WorkerProcess(url, f"{queue},{queue}_prefork", f"rec-prefork-{kind}"),
            WorkerProcess(url, queue, f"rec-threads-{kind}", pool="threads", concurrency=2),
        ]
        try:
            recorder.pump_until(
                lambda: all(recorder.seen("worker-online", w.hostname) for w in workers),
                60,
                "the workers to come online",
            )
            app = producer(url, queue)
            app.conf.task_routes = {"obs.sleep": {"queue": f"{queue}_prefork"}}
            expected = sum(send(app) for send in WORKLOADS[workload])
            succeeded_only = workload in SUCCEED_IN_THE_END
            recorder.pump_until(
                lambda: recorder.finished_tasks(succeeded_only) >= expected,
                120,
                f"{expected} tasks to finish",
            )
            for worker in workers:
                worker.close()  # SIGTERM: a warm shutdown that ends with worker-offline
            recorder.pump_until(
                lambda: all(recorder.seen("worker-offline", w.hostname) for w in workers),
                30,
                "worker-offline from every worker",
            )
        finally:
            for worker in workers:
                worker.close()
            recorder.close()
    STREAMS.mkdir(exist_ok=True)
    path = STREAMS / f"{workload}-{kind}.jsonl"
    lines = (json.dumps(body, sort_keys=True, separators=(",", ":")) for body in recorder.messages)
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", choices=("redis", "amqp"), action="append")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), action="append")
    args = parser.parse_args()
    for kind in args.broker or ("redis", "amqp"):
        for workload in args.workload or sorted(WORKLOADS):
            started = time.monotonic()
            path = record(kind, workload)
            events = sum(
                len(b) if isinstance(b, list) else 1
                for b in map(json.loads, path.read_text().splitlines())
            )
            print(f"{path}: {events} events in {time.monotonic() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
