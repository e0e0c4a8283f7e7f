"""Remote-control broadcasts to the cluster's workers, from a background thread.

Workers started without `-E` send no task events; like Flower, the exporter periodically
broadcasts `enable_events` so such clusters still report. After each (re)connect it also
broadcasts `heartbeat` so every worker announces itself at once instead of within its next
heartbeat interval (celery's own `Receiver.wakeup_workers` does the same).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery

log = logging.getLogger(__name__)


class WorkerControl:
    def __init__(
        self,
        broker_url: str,
        transport_options: dict[str, Any],
        enable_events: bool,
        interval: float,
    ) -> None:
        self._app = Celery("celery-obs", broker=broker_url, set_as_current=False)
        self._app.conf.broker_transport_options = transport_options
        self._app.conf.broker_connection_retry_on_startup = False
        self._enable_events = enable_events
        self._interval = interval
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)

    def poke(self) -> None:
        """Broadcast now (called when the event consumer has just connected)."""
        self._wake.set()

    def broadcast_once(self) -> None:
        commands = ["heartbeat"] + (["enable_events"] if self._enable_events else [])
        for command in commands:
            try:
                self._app.control.broadcast(command)
            except Exception as exc:  # a broker hiccup here must not stop the exporter
                log.warning(
                    "broadcast %r to workers failed: %s: %s", command, type(exc).__name__, exc
                )
                return

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self._interval)
            if self._stopping.is_set():
                break
            self._wake.clear()
            self.broadcast_once()
        self._app.close()
