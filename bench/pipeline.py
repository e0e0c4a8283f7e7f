"""Microbenchmark of the processing stage alone: envelope decode + tracker, no broker, no threads.

    python bench/pipeline.py --tasks 50000 --batch 1 [--profile]

Prints microseconds per event; with --profile, the top of a cProfile run.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import threading
import time

import eventgen

from celery_obs.exporter.consumer import BrokerStatus, EventConsumer
from celery_obs.exporter.tracker import Tracker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", action="store_true")
    eventgen.add_workload_arguments(parser)
    args = parser.parse_args()
    workload = eventgen.workload_from(args)
    payloads = [payload for _, payload in eventgen.encode_redis(workload, 0)]
    tracker = Tracker()
    consumer = EventConsumer(lambda: None, tracker, threading.Lock(), BrokerStatus())  # type: ignore[arg-type,return-value]
    profiler = cProfile.Profile() if args.profile else None
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    for payload in payloads:
        consumer.on_payload(payload)
    if profiler:
        profiler.disable()
    took = time.perf_counter() - started
    events = len(workload.events)
    print(
        f"{events:,} events in {len(payloads):,} messages: {took:.2f}s, "
        f"{took / events * 1e6:.2f} us/event, {events / took:,.0f} events/s"
    )
    assert sum(tracker.stats.events_by_type.values()) == events
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
