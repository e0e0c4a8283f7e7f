"""The processing stage alone, against its ceiling, in one process: no broker, no threads.

    python bench/pipeline.py --tasks 50000 --batch 1 [--runs 3] [--profile [tracker]]

The workload's Redis wire bytes (RESP pmessage frames, as the server sends them) go through:

  split      hiredis splits the frames, nothing else: what reading costs;
  ceiling    split, then each message decoded the plain way (JSON envelope, base64, JSON body):
             the decode-only loop, the most a consumer that decodes everything could do;
  exporter   split, then our consumer's own path (envelope shortcut, decode, the tracker's
             bookkeeping under its lock), 16 kB slices handed over at a time as the reader does;
  decode     split, then our decoder alone (what `exporter` costs before the tracker);
  tracker    the tracker alone, handed the decoded events of each 16 kB slice: its bookkeeping.

`decode` and `tracker` split `exporter`'s time; their rates are not shares of the ceiling.

Each is run `--runs` times, interleaved; the median and the spread (min-max) are printed, and
the exporter's share of the ceiling.
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import pstats
import statistics
import threading
import time
from collections.abc import Callable

import eventgen
import hiredis
import orjson

from celery_obs.exporter.consumer import BrokerStatus, EventConsumer
from celery_obs.exporter.events import EventDecoder
from celery_obs.exporter.tracker import Tracker

FEED = 16 << 10  # as the Redis reader feeds hiredis


def wire_bytes(workload: eventgen.Workload) -> bytes:
    frames = []
    for channel, payload in eventgen.encode_redis(workload, 0):
        parts = [b"pmessage", b"/0.celeryev/*", channel, payload]
        frames.append(b"*4\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(part), part) for part in parts))
    return b"".join(frames)


def frames(wire: bytes, handle: Callable[[list[bytes]], None]) -> None:
    reader = hiredis.Reader()
    for offset in range(0, len(wire), FEED):
        reader.feed(wire, offset, min(FEED, len(wire) - offset))
        payloads = []
        while (frame := reader.gets()) is not False:
            payloads.append(frame[3])
        handle(payloads)


def split(wire: bytes) -> int:
    count = 0

    def handle(payloads: list[bytes]) -> None:
        nonlocal count
        count += len(payloads)

    frames(wire, handle)
    return count


def ceiling(wire: bytes) -> int:
    count = 0

    def handle(payloads: list[bytes]) -> None:
        nonlocal count
        for payload in payloads:
            envelope = orjson.loads(payload)
            body = orjson.loads(base64.b64decode(envelope["body"]))
            count += len(body) if isinstance(body, list) else 1

    frames(wire, handle)
    return count


def exporter(wire: bytes) -> int:
    tracker = Tracker()
    consumer = EventConsumer(lambda: None, tracker, threading.Lock(), BrokerStatus())  # type: ignore[arg-type,return-value]
    frames(wire, consumer.on_payloads)
    return sum(tracker.stats.events_by_type.values())


def decode(wire: bytes) -> int:
    decoder = EventDecoder(lambda reason: None)
    count = 0

    def handle(payloads: list[bytes]) -> None:
        nonlocal count
        for payload in payloads:
            count += len(decoder.decode_envelope(payload))

    frames(wire, handle)
    return count


def decoded_slices(wire: bytes) -> list[list[dict]]:
    decoder = EventDecoder(lambda reason: None)
    slices: list[list[dict]] = []

    def handle(payloads: list[bytes]) -> None:
        slices.append([event for payload in payloads for event in decoder.decode_envelope(payload)])

    frames(wire, handle)
    return slices


def tracker(slices: list[list[dict]]) -> int:
    # The tracker reads the events and never changes them: every run can be handed the same.
    tracker = Tracker()
    for events in slices:
        tracker.handle_all(events)
    return sum(tracker.stats.events_by_type.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--profile",
        nargs="?",
        const="exporter",
        choices=("exporter", "tracker"),
        help="cProfile the exporter's path (default) or the tracker's alone",
    )
    eventgen.add_workload_arguments(parser)
    args = parser.parse_args()
    workload = eventgen.workload_from(args)
    events = len(workload.events)
    wire = wire_bytes(workload)
    print(f"{events:,} events, {len(wire) / 1e6:.0f} MB of wire, batch {workload.batch}")
    slices = decoded_slices(wire)
    stages: dict[str, Callable[[], int]] = {
        "split": lambda: split(wire),
        "ceiling": lambda: ceiling(wire),
        "exporter": lambda: exporter(wire),
        "decode": lambda: decode(wire),
        "tracker": lambda: tracker(slices),
    }
    rates: dict[str, list[float]] = {name: [] for name in stages}
    for _ in range(args.runs):
        for name, stage in stages.items():
            started = time.perf_counter()
            counted = stage()
            took = time.perf_counter() - started
            assert counted == (events if name != "split" else counted), (name, counted)
            rates[name].append(events / took)
    for name, values in rates.items():
        print(
            f"  {name:9} {statistics.median(values):>11,.0f} events/s  "
            f"({min(values):,.0f}-{max(values):,.0f})"
        )
    share = [ours / top for ours, top in zip(rates["exporter"], rates["ceiling"], strict=True)]
    print(
        f"  exporter / ceiling: {statistics.median(share):.0%} ({min(share):.0%}-{max(share):.0%})"
    )
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(stages[args.profile])
        pstats.Stats(profiler).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
