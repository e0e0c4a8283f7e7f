"""Continuous demo load for the compose stack: a steady mix of the demo app's tasks.

`python -m load` sends DEMO_TASKS_PER_SECOND tasks a second (default 5) until stopped. Every
20 tasks are 7 additions, 7 card charges, 3 inventory syncs, 2 image resizes and 1 report;
each kind numbers its own calls, and the demo tasks turn that number into their outcome.
It touches HEARTBEAT_FILE after every successful send, so the container's health check tells
a producer that sends from one that is stuck or cannot reach the broker.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import demo_app

log = logging.getLogger("demo.load")

HEARTBEAT_FILE = Path(os.environ.get("DEMO_HEARTBEAT_FILE", "/tmp/demo-load.alive"))

#: One round of the mix, interleaved so that every kind shows up every few seconds.
SCHEDULE = (
    ["add", "charge_card"] * 4
    + ["sync_inventory", "resize_image", "add", "charge_card"] * 2
    + ["sync_inventory", "build_report", "add", "charge_card"]
)
TASKS = {
    "add": lambda n: demo_app.add.delay(n, n),
    "charge_card": lambda n: demo_app.charge_card.delay(n),
    "sync_inventory": lambda n: demo_app.sync_inventory.delay(n),
    "resize_image": lambda n: demo_app.resize_image.delay(640 + n),
    "build_report": lambda n: demo_app.build_report.delay(n),
}


def run(tasks_per_second: float, stop: threading.Event) -> Counter[str]:
    sent: Counter[str] = Counter()
    interval = 1.0 / tasks_per_second
    deadline = time.monotonic()
    i = 0
    while not stop.is_set():
        kind = SCHEDULE[i % len(SCHEDULE)]
        try:
            TASKS[kind](sent[kind])
            sent[kind] += 1
            i += 1
            HEARTBEAT_FILE.touch()
        except Exception as exc:  # a broker restart must not end the demo load
            log.warning("sending %s failed: %s: %s", kind, type(exc).__name__, exc)
            stop.wait(1.0)
        if i % 500 == 0 and i:
            log.info("sent %d tasks: %s", i, dict(sent))
        # A fixed schedule, not sleep(interval): a slow send does not lower the rate.
        deadline = max(deadline + interval, time.monotonic() - 1.0)
        stop.wait(max(0.0, deadline - time.monotonic()))
    return sent


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    rate = float(os.environ.get("DEMO_TASKS_PER_SECOND", "5"))
    if rate <= 0:
        raise SystemExit(f"DEMO_TASKS_PER_SECOND must be > 0, got {rate}")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    log.info("sending %g tasks/s to %s", rate, demo_app.app.connection().as_uri())
    sent = run(rate, stop)
    log.info("stopped after %d tasks: %s", sum(sent.values()), dict(sent))


if __name__ == "__main__":
    main()
