"""Benchmark of log_shipping (issue 4's targets), by hand:

record    cost of one log call on the task's thread: plain `logging` text formatting vs our
          ECS JSON to a stream (the stdout output) vs JSON handed to the network shipper
          (while its thread ships to a local receiver). Target: JSON <= 1.5x plain.
ship      records/s one process ships to a local HTTP receiver (Logstash's http input
          stand-in, in its own process). Target: >= 50,000/s.
prefork   no-op tasks/s of a real prefork worker (-c 2, INFO logging to /dev/null), without
          install(), with install() (stdout JSON), and with install() shipping over HTTP.
          Target: with install() >= 90% of without.

python bench/logs.py record
python bench/logs.py ship --records 300000
python bench/logs.py prefork --tasks 20000
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import redis

from celery_obs.log_shipping.context import TaskContextFilter, current_task
from celery_obs.log_shipping.formatter import EcsJsonFormatter
from celery_obs.log_shipping.shipper import ShippingHandler
from celery_obs.log_shipping.sinks import HttpSink

HERE = Path(__file__).resolve().parent
CELERY_TEXT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"  # Celery's default


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(port: int, counter: multiprocessing.Value) -> None:  # type: ignore[valid-type]
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as Logstash's http input

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with counter.get_lock():
                counter.value += body.count(b'"@timestamp"')  # one per record
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


class Receiver:
    """The stand-in for Logstash, in another process so it does not share our GIL."""

    def __init__(self) -> None:
        self.port = free_port()
        self.count = multiprocessing.Value("q", 0)
        self.process = multiprocessing.Process(
            target=_serve, args=(self.port, self.count), daemon=True
        )
        self.process.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise SystemExit("the receiver did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def stop(self) -> None:
        self.process.terminate()


def logger_with(handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(f"bench.{uuid.uuid4().hex}")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


def per_record_us(logger: logging.Logger, count: int) -> float:
    start = time.perf_counter()
    for i in range(count):
        logger.info("task step %d done", i)
    return (time.perf_counter() - start) / count * 1e6


def bench_record(args: argparse.Namespace) -> None:
    devnull = open(os.devnull, "w")  # noqa: SIM115 - lives for the whole run
    current_task.set({"id": str(uuid.uuid4()), "name": "bench.noop"})  # as inside a task
    plain = logging.StreamHandler(devnull)
    plain.setFormatter(logging.Formatter(CELERY_TEXT))
    stream = logging.StreamHandler(devnull)
    stream.setFormatter(EcsJsonFormatter(service_name="bench"))
    stream.addFilter(TaskContextFilter())
    receiver = Receiver()
    with tempfile.TemporaryDirectory() as spool:
        shipper = ShippingHandler(HttpSink(receiver.url), spool, max_queue=args.records * 2)
        shipper.setFormatter(EcsJsonFormatter(service_name="bench"))
        shipper.addFilter(TaskContextFilter())
        subjects = {"plain text": plain, "ECS JSON, stdout": stream, "ECS JSON, shipped": shipper}
        results = {name: [] for name in subjects}  # type: dict[str, list[float]]
        for _ in range(args.repeat):  # interleaved, best of N: the machine is shared
            for name, handler in subjects.items():
                results[name].append(per_record_us(logger_with(handler), args.records))
        shipper.close()
    receiver.stop()
    base = min(results["plain text"])
    print(f"{'handler':<20} {'us/record':>10} {'vs plain':>9}")
    for name, times in results.items():
        print(f"{name:<20} {min(times):>10.2f} {min(times) / base:>8.2f}x")


def bench_ship(args: argparse.Namespace) -> None:
    receiver = Receiver()
    with tempfile.TemporaryDirectory() as spool:
        # A queue as large as the run: this measures shipping, not the drop-oldest bound.
        shipper = ShippingHandler(HttpSink(receiver.url), spool, max_queue=args.records + 1)
        shipper.setFormatter(EcsJsonFormatter(service_name="bench"))
        logger = logger_with(shipper)
        start = time.perf_counter()
        for i in range(args.records):
            logger.info("task step %d done", i)
        logged = time.perf_counter() - start
        deadline = time.monotonic() + 120
        while receiver.count.value < args.records and time.monotonic() < deadline:
            time.sleep(0.01)
        elapsed = time.perf_counter() - start
        shipper.close()
    received = receiver.count.value
    receiver.stop()
    print(f"records logged   {args.records} in {logged:.2f}s")
    print(f"records received {received} (dropped {shipper.dropped})")
    print(f"end to end       {elapsed:.2f}s = {received / elapsed:,.0f} records/s")


def run_worker(args: argparse.Namespace, variant: str, receiver: Receiver | None) -> float:
    queue = f"bench_logs_{uuid.uuid4().hex[:8]}"
    key = f"bench:done:{queue}"
    client = redis.Redis.from_url(args.broker)
    env = {
        **os.environ,
        "BENCH_BROKER": args.broker,
        "BENCH_QUEUE": queue,
        "BENCH_LOG_INSTALL": "0" if variant == "without install()" else "1",
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    if receiver is not None:
        env["CELERY_OBS_LOG_OUTPUT"] = f"stdout,{receiver.url}"
        env["CELERY_OBS_LOG_SPOOL_DIR"] = tempfile.mkdtemp(prefix="bench-spool-")
    from celery import Celery

    producer = Celery("bench_producer", broker=args.broker, set_as_current=False)
    with producer.connection_for_write() as connection:  # preload: time the worker, not us
        publish = producer.amqp.producer_pool.acquire(block=True)
        for _ in range(args.tasks):
            producer.send_task(
                "bench.noop", (key,), queue=queue, connection=connection, producer=publish
            )
        publish.release()
    command = [sys.executable, "-m", "celery", "-A", "log_app", "worker", "-P", "prefork"]
    worker = subprocess.Popen(
        [*command, "-c", "2", "-Q", queue, "-l", "INFO", "--without-mingle", "--without-gossip"],
        env=env,
        cwd=HERE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 600
        while int(client.get(key) or 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        start, first = time.perf_counter(), int(client.get(key) or 0)
        while int(client.get(key) or 0) < args.tasks and time.monotonic() < deadline:
            time.sleep(0.02)
        elapsed = time.perf_counter() - start
        done = int(client.get(key) or 0)
    finally:
        worker.terminate()
        worker.wait(60)
        client.delete(key, queue)
    return (done - first) / elapsed


def bench_prefork(args: argparse.Namespace) -> None:
    receiver = Receiver()
    variants = {"without install()": None, "install(), stdout": None, "install(), +HTTP": receiver}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.repeat):
        for name, sink in variants.items():
            rates[name].append(run_worker(args, name, sink))
            print(f"round {round_ + 1}: {name:<20} {rates[name][-1]:,.0f} tasks/s", flush=True)
    receiver.stop()
    base = max(rates["without install()"])
    print(f"{'variant':<20} {'tasks/s (best)':>15} {'vs without':>11}")
    for name, values in rates.items():
        print(f"{name:<20} {max(values):>15,.0f} {max(values) / base:>10.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    record = commands.add_parser("record", help="cost of one log call on the task's thread")
    record.add_argument("--records", type=int, default=100_000)
    record.add_argument("--repeat", type=int, default=3)
    ship = commands.add_parser("ship", help="records/s shipped to a local HTTP receiver")
    ship.add_argument("--records", type=int, default=300_000)
    prefork = commands.add_parser("prefork", help="no-op tasks/s with and without install()")
    prefork.add_argument("--tasks", type=int, default=20_000)
    prefork.add_argument("--repeat", type=int, default=2)
    prefork.add_argument("--broker", default="redis://127.0.0.1:6379/13")
    args = parser.parse_args()
    {"record": bench_record, "ship": bench_ship, "prefork": bench_prefork}[args.command](args)


if __name__ == "__main__":
    main()
