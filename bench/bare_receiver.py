"""The yardstick: Celery's own `app.events.Receiver` doing nothing but count events by type.

Run by bench/run.py as a subprocess, like the exporter. It prints `ready` once it sees the
driver's probe heartbeat (so the subscription is live), then, when it has counted `--expect`
events or has seen nothing for `--idle` seconds, one JSON line: counts by type and the wall time
of the first and last event.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter

from celery import Celery

PROBE_HOST = "bench-probe@driver"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--broker-url", required=True)
    parser.add_argument("--expect", type=int, required=True)
    parser.add_argument("--idle", type=float, default=10.0)
    args = parser.parse_args()

    counts: Counter = Counter()
    state = {"first": 0.0, "last": 0.0, "ready": False}
    done = threading.Event()

    def on_event(event: dict) -> None:
        now = time.time()
        if event.get("hostname") == PROBE_HOST:
            if not state["ready"]:
                state["ready"] = True
                print("ready", flush=True)
            return
        if not state["first"]:
            state["first"] = now
        state["last"] = now
        counts[event["type"]] += 1
        if sum(counts.values()) >= args.expect:
            done.set()

    def watchdog() -> None:
        while not done.wait(0.5):
            if state["last"] and time.time() - state["last"] > args.idle:
                done.set()

    app = Celery(broker=args.broker_url, set_as_current=False)
    threading.Thread(target=watchdog, daemon=True).start()
    with app.connection_for_read() as connection:
        receiver = app.events.Receiver(connection, handlers={"*": on_event})
        consumer = threading.Thread(target=receiver.capture, kwargs={"wakeup": False}, daemon=True)
        consumer.start()
        done.wait()
    print(json.dumps({"counts": counts, "first": state["first"], "last": state["last"]}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
