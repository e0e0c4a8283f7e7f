"""Queue depth probes, polled in the background and cached so a scrape never touches the broker.

The probe is a passive `queue_declare`, which every kombu transport answers with its message count:
on Redis kombu sums the list and its priority sub-lists (`queue\\x06\\x163`, ...), on RabbitMQ the
broker reports the queue's ready messages. A queue that does not exist (on Redis: an empty one,
since Redis deletes empty lists) has length 0. On AMQP a failed passive declare closes the
channel, so the probe opens a fresh one after each miss.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable

from kombu import Connection
from kombu.exceptions import ChannelError

log = logging.getLogger(__name__)


class QueueLengths:
    """The latest known length of each queue, shared between the probe thread and scrapes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lengths: dict[str, int] = {}
        self._errors = 0

    def update(self, lengths: dict[str, int]) -> None:
        with self._lock:
            self._lengths.update(lengths)

    def count_error(self) -> None:
        with self._lock:
            self._errors += 1

    def snapshot(self) -> tuple[dict[str, int], int]:
        with self._lock:
            return dict(self._lengths), self._errors


def probe_lengths(connection: Connection, queues: Iterable[str]) -> dict[str, int]:
    """Ask the broker for each queue's message count over one connection."""
    lengths: dict[str, int] = {}
    channel = connection.channel()
    try:
        for queue in sorted(queues):
            try:
                lengths[queue] = channel.queue_declare(queue=queue, passive=True).message_count
            except ChannelError:
                lengths[queue] = 0
                channel.close()
                channel = connection.channel()
    finally:
        channel.close()
    return lengths


class QueueProbe:
    """Poll queue lengths every `interval` seconds in a daemon thread until `stop()`."""

    def __init__(
        self,
        connect: Callable[[], Connection],
        queue_names: Callable[[], set[str]],
        cache: QueueLengths,
        interval: float,
    ) -> None:
        self._connect = connect
        self._queue_names = queue_names
        self._cache = cache
        self._interval = interval
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="queue-probe", daemon=True)
        self._connection: Connection | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._thread.join(timeout)

    def probe_once(self) -> None:
        names = self._queue_names()
        if not names:
            return
        try:
            if self._connection is None:
                self._connection = self._connect()
                self._connection.ensure_connection(max_retries=1)
            self._cache.update(probe_lengths(self._connection, names))
        except Exception as exc:  # any broker failure: keep the last lengths, count, retry later
            self._cache.count_error()
            log.warning("queue length probe failed: %s: %s", type(exc).__name__, exc)
            self._drop_connection()

    def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            # The connection is already broken: nothing left to release.
            with contextlib.suppress(Exception):
                connection.release()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self.probe_once()
            self._stopping.wait(self._interval)
        self._drop_connection()
