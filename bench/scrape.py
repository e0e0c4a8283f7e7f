"""Cost of one /metrics rendering, in each format, after a generated workload.

    python bench/scrape.py --names 50 --tasks 20000 [--running 500]

Feeds the workload straight into a tracker (no broker), optionally leaves `--running` tasks
started and `--running` more prefetched on the workers (the stuck-and-waiting gauges), then
renders the exposition 20 times per format (text, OpenMetrics, protobuf with native histograms)
and prints the median time and the size in kB (1000 bytes), plain and gzipped (what Prometheus
fetches).
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import threading
import time

import eventgen

from celery_obs.exporter.collector import Exposition
from celery_obs.exporter.consumer import BrokerStatus
from celery_obs.exporter.queues import QueueLengths
from celery_obs.exporter.tracker import Tracker


def stuck(tracker: Tracker, count: int, names: int) -> None:
    now = time.time()
    for i in range(count):
        name, queue = f"bench.tasks.task_{i % names}", f"queue-{i % 4}"
        for uuid, started in ((f"run-{i}", True), (f"wait-{i}", False)):
            host = f"bench-{i % 20}@host-{i % 5}"
            events = [
                {"type": "task-sent", "uuid": uuid, "name": name, "queue": queue,
                 "retries": 0, "timestamp": now - 60, "hostname": "producer"},
                {"type": "task-received", "uuid": uuid, "name": name, "retries": 0,
                 "timestamp": now - 59, "hostname": host},
            ]  # fmt: skip
            if started:
                events.append(
                    {"type": "task-started", "uuid": uuid, "timestamp": now - 58, "hostname": host}
                )
            tracker.handle_all(events)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    eventgen.add_workload_arguments(parser)
    parser.add_argument(
        "--running", type=int, default=0, help="tasks left running (and as many waiting)"
    )
    parser.add_argument("--times", type=int, default=20)
    args = parser.parse_args()
    workload = eventgen.workload_from(args)
    tracker = Tracker()
    for event in workload.events:
        tracker.handle(dict(event))
    stuck(tracker, args.running, workload.names)
    exposition = Exposition(tracker, threading.Lock(), BrokerStatus(), QueueLengths(), "bench")
    renders = {
        "text 0.0.4": lambda: exposition.render(False),
        "openmetrics": lambda: exposition.render(True),
        "protobuf": exposition.render_protobuf,
    }
    for kind, render in renders.items():
        took, body = [], b""
        for _ in range(args.times):
            started = time.perf_counter()
            body = render()
            took.append((time.perf_counter() - started) * 1000)
        newlines = body.count(b"\n")
        lines = f"{newlines:,} lines" if kind != "protobuf" else "native histograms"
        print(
            f"{kind:12} {statistics.median(took):6.1f} ms  {len(body) / 1000:7.0f} kB  "
            f"gzip {len(gzip.compress(body, 1)) / 1000:5.0f} kB  {lines}"
        )


if __name__ == "__main__":
    main()
