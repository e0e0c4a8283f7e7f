"""Queue depth probes, polled in the background and cached so a scrape never touches the broker.

On RabbitMQ (and other transports) the probe is a passive `queue_declare`, answered with the
queue's ready messages; a failed passive declare closes the channel, so the probe opens a fresh
one after each miss. On Redis a queue is a list plus one sub-list per priority step
(`queue\\x06\\x163`, ...). kombu's own count only looks at the steps *this* process is configured
with, which need not be the cluster's (a cluster with 10 steps showed 4 of 10 messages), so the
probe reads every sub-list a cluster can have: kombu clamps priorities to 0-9, so whatever
`priority_steps` the producers use, their sub-lists are among these ten. The key separator and
`global_keyprefix` come from the transport options, as kombu applies them; the probe reads them
over the exporter's own Redis link (one pipelined LLEN per list), not through kombu's transport,
which would load redis-py for this alone. A queue that does not exist (on Redis: an empty one,
since Redis deletes empty lists) has length 0; a key that is not a list fails that queue's probe
alone.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from kombu import Connection
from kombu.exceptions import ChannelError

from . import redis_link
from .outages import OutageLog
from .redis_link import RedisSettings
from .transports import connect_once

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

    def count_error(self, n: int = 1) -> None:
        with self._lock:
            self._errors += n

    def forget(self, queue: str) -> None:
        with self._lock:
            self._lengths.pop(queue, None)

    def snapshot(self) -> tuple[dict[str, int], int]:
        with self._lock:
            return dict(self._lengths), self._errors


#: kombu's virtual transport clamps message priorities to 0..9 (`min/max_priority`), and a
#: priority step's sub-list is named after the step: with any `priority_steps`, these cover all.
_REDIS_PRIORITIES = range(1, 10)
#: A name that failed this many probes in a row is not probed again for SUSPEND_FOR seconds.
FAILURES_BEFORE_SUSPEND = 5
SUSPEND_FOR = 3600.0

#: (lengths of the queues that answered, reason per queue that failed)
Probed = tuple[dict[str, int], dict[str, str]]


class LengthReader(Protocol):
    """One open link to the broker that reads queue lengths until closed."""

    def lengths(self, queues: list[str]) -> Probed: ...

    def close(self) -> None: ...


#: kombu's key separator between a Redis queue's name and its priority step.
_REDIS_SEP = "\x06\x16"
#: LLENs per queue: its list and one per priority step.
_PER_QUEUE = len(_REDIS_PRIORITIES) + 1


class RedisLengthReader:
    """Each queue's list and priority sub-lists summed, in one pipelined round trip."""

    def __init__(self, settings: RedisSettings, timeout: float = 10.0) -> None:
        self._settings = settings
        self._timeout = timeout
        self._sock = self._open()

    def _open(self) -> Any:
        return redis_link.connect(self._settings, timeout=self._timeout, select=True)

    def lengths(self, queues: list[str]) -> Probed:
        try:
            return self._lengths(queues)
        except redis_link.RedisRefused:  # the server said no: a new link would hear the same
            raise
        except ConnectionError:
            # The server closed an idle link (its `timeout`, a proxy's idle cut) or restarted:
            # LLEN only reads, so one retry on a fresh link is safe and spares a failed probe.
            self._sock.close()
            self._sock = self._open()
            return self._lengths(queues)

    def _lengths(self, queues: list[str]) -> Probed:
        sep = str(self._settings.options.get("sep") or _REDIS_SEP)
        key = self._settings.key
        lengths: dict[str, int] = {}
        failures: dict[str, str] = {}
        asked: list[str] = []
        commands: list[bytes] = []
        for queue in queues:
            names = [queue, *(f"{queue}{sep}{p}" for p in _REDIS_PRIORITIES)]
            try:
                llens = [redis_link.command("LLEN", key(name)) for name in names]
            except UnicodeEncodeError:  # a lone surrogate: no Redis key can be named so
                failures[queue] = "not a valid Redis key (not encodable as UTF-8)"
                continue
            commands.extend(llens)
            asked.append(queue)
        replies = redis_link.request(self._sock, commands) if commands else []
        for reply in replies:
            if isinstance(reply, redis_link.ReplyError) and not _about_one_key(reply):
                # LOADING, BUSY, MASTERDOWN, a command the ACL forbids: the whole probe fails
                # (and is retried), rather than every queue failing towards its suspension.
                raise redis_link.RedisRefused(f"Redis refused LLEN: {reply}")
        for i, queue in enumerate(asked):
            sizes = replies[i * _PER_QUEUE : (i + 1) * _PER_QUEUE]
            errors = [size for size in sizes if not isinstance(size, int)]
            if errors:  # e.g. WRONGTYPE: a key of that name that is not a list
                failures[queue] = f"{type(errors[0]).__name__}: {errors[0]}"
            else:
                lengths[queue] = sum(sizes)
        return lengths, failures

    def close(self) -> None:
        self._sock.close()


def _about_one_key(reply: Exception) -> bool:
    """An error reply about the key asked for, not about the server or the command: a key that
    is not a list, or one the ACL user may not read (`NOPERM ... access a key`)."""
    text = str(reply)
    if text.startswith("WRONGTYPE"):
        return True
    # Redis 7.2+: "No permissions to access a key"; 6.2-7.0: "... access one of the keys used
    # as arguments". A command the user may not run says "run the 'llen' command".
    return text.startswith("NOPERM") and ("access a key" in text or "keys used as" in text)


class DeclaredLengthReader:
    """Passive declares over a kombu connection (RabbitMQ and kombu's other transports)."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        try:
            connect_once(connection)
        except BaseException:
            self.close()
            raise

    def lengths(self, queues: list[str]) -> Probed:
        return declared_lengths(self._connection, queues)

    def close(self) -> None:
        # After a failure the connection is already broken: nothing left to release.
        with contextlib.suppress(Exception):
            self._connection.release()


def length_reader(
    connect: Callable[[], Connection], redis: RedisSettings | None
) -> Callable[[], LengthReader]:
    """How the probe opens its link: its own socket on Redis, a kombu connection otherwise."""
    if redis is not None:
        return lambda: RedisLengthReader(redis)
    return lambda: DeclaredLengthReader(connect())


def declared_lengths(connection: Connection, queues: list[str]) -> Probed:
    """A passive declare per queue: a queue that does not exist holds 0 messages."""
    lengths: dict[str, int] = {}
    failures: dict[str, str] = {}
    channel = connection.channel()
    try:
        for queue in queues:
            if len(queue.encode("utf-8", "replace")) > 255:  # AMQP's shortstr: refused unsent
                failures[queue] = "not a valid AMQP queue name (over 255 bytes)"
                continue
            try:
                lengths[queue] = channel.queue_declare(queue=queue, passive=True).message_count
            except ChannelError as exc:  # the broker closed the channel: take a new one
                if getattr(exc, "code", None) == 404:
                    lengths[queue] = 0
                else:  # 403 for reserved amq.* names, 406, ...
                    failures[queue] = f"{type(exc).__name__}: {exc}"
                with contextlib.suppress(Exception):
                    channel.close()
                channel = connection.channel()
    finally:
        with contextlib.suppress(Exception):
            channel.close()
    return lengths, failures


class QueueProbe:
    """Poll queue lengths every `interval` seconds in a daemon thread until `stop()`.

    A queue that fails keeps its last known length and is counted; one that fails
    FAILURES_BEFORE_SUSPEND probes in a row (a name that is not a queue) is dropped from the
    metrics and not probed for SUSPEND_FOR seconds, said once in the log.
    """

    def __init__(
        self,
        open_reader: Callable[[], LengthReader],
        queue_names: Callable[[], set[str]],
        cache: QueueLengths,
        interval: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._open_reader = open_reader
        self._queue_names = queue_names
        self._cache = cache
        self._interval = interval
        self._monotonic = monotonic
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="queue-probe", daemon=True)
        self._reader: LengthReader | None = None
        self._outage = OutageLog(log, "queue length probe")
        self._failures: dict[str, int] = {}  # name -> failed probes in a row
        self._suspended: dict[str, float] = {}  # name -> monotonic time it may be probed again

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        else:  # never started (probed by hand): just let go of the connection
            self._drop_reader()

    def probe_once(self) -> None:
        now = self._monotonic()
        for name, until in list(self._suspended.items()):
            if until <= now:
                del self._suspended[name]
        names = self._queue_names() - self._suspended.keys()
        if not names:
            return
        try:
            if self._reader is None:
                self._reader = self._open_reader()
            lengths, failures = self._reader.lengths(sorted(names))
        except Exception as exc:  # any broker failure: keep the last lengths, count, retry later
            self._cache.count_error()
            self._outage.failed(exc)
            self._drop_reader()
            return
        self._outage.succeeded()
        self._cache.update(lengths)
        for name in lengths:
            self._failures.pop(name, None)
        if failures:
            self._cache.count_error(len(failures))
        for name, reason in failures.items():
            self._failures[name] = failed = self._failures.get(name, 0) + 1
            if failed >= FAILURES_BEFORE_SUSPEND:
                del self._failures[name]
                self._suspended[name] = now + SUSPEND_FOR
                self._cache.forget(name)
                log.warning(
                    "queue %r failed %d length probes in a row (%s); not probing it for %.0f s",
                    name,
                    failed,
                    reason,
                    SUSPEND_FOR,
                )

    def _drop_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            with contextlib.suppress(Exception):
                reader.close()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self.probe_once()
            self._stopping.wait(self._interval)
        self._drop_reader()
