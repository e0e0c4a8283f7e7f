"""Wire the stages together: consumer -> tracker -> collector -> http, plus the background probes.

`Exporter` owns the threads and nothing else; each stage stays testable on its own. Metrics are
rendered by its own `Exposition`, never through prometheus_client's process-global registry
(`collector.CeleryCollector` adapts it to a registry of your own if you want one).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

from kombu import Connection

from . import redis_link
from .collector import CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE, Exposition
from .config import ExporterConfig, parse_listen_address
from .consumer import BrokerStatus, EventConsumer, default_queue_name
from .control import WorkerControl
from .http import MetricsServer
from .httpwire import OPENMETRICS, PROTOBUF
from .protobuf import CONTENT_TYPE as PROTOBUF_CONTENT_TYPE
from .queues import QueueLengths, QueueProbe, length_reader
from .redis_stream import HAVE_HIREDIS
from .tracker import Tracker
from .transports import driver_of
from .webconfig import load_web_config

log = logging.getLogger(__name__)

#: Default socket timeouts per kombu driver; the user's --broker-transport-option wins.
_IO_TIMEOUTS: dict[str, dict[str, float]] = {
    "redis": {"socket_timeout": 10.0},
    "amqp": {"read_timeout": 10.0, "write_timeout": 10.0},
}


def package_version() -> str:
    from .. import __version__  # the package's one version (pyproject reads it too)

    return __version__


class Exporter:
    def __init__(
        self,
        config: ExporterConfig,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        # Parse everything that can be wrong before any thread starts: errors surface at startup.
        web_config = load_web_config(config.web_config_file) if config.web_config_file else None
        address = parse_listen_address(config.listen_address)

        self.lock = threading.Lock()
        self.tracker = Tracker(config.limits, clock=clock)
        self.status = BrokerStatus(broker=config.safe_broker_url)
        scrub = config.scrubber()
        # On Redis every link is the exporter's own (events, queue lengths, broadcasts): no
        # kombu Connection is built, which would load kombu's Redis transport and redis-py.
        # (Raises BrokerUrlError for a Redis URL kombu would refuse too.)
        redis = redis_link.settings_for_url(config.broker_url, config.transport_options)
        self.queue_lengths = QueueLengths()
        self.control = WorkerControl(
            self.connect_without_heartbeat,  # a connection for each round, nothing to keep alive
            enable_events=config.enable_events,
            interval=config.enable_events_interval,
            redis=redis,
            status=self.status,
        )
        # A worker that just started hears enable_events as soon as it listens for it, not at
        # the next periodic round (a deploy would lose its first tasks' events meanwhile).
        self.tracker.workers.on_started = self.control.poke
        queue_options = config.event_queue
        if not queue_options.name:  # one queue per exporter instance: host and port
            name = default_queue_name(queue_options.prefix, str(address[1]))
            queue_options = dataclasses.replace(queue_options, name=name)
        self.consumer = EventConsumer(
            self.connect,
            self.tracker,
            self.lock,
            self.status,
            queue_options=queue_options,
            scrub=scrub,
            on_connected=self.control.poke,
            # The event stream splits frames with hiredis (a dependency); an install without
            # it reads events through kombu, slower but the same events.
            redis=redis if HAVE_HIREDIS else None,
        )
        self.probe = QueueProbe(
            length_reader(self.connect_without_heartbeat, redis),
            self._queue_names,
            self.queue_lengths,
            config.queue_poll_interval,
        )
        self.exposition = Exposition(
            self.tracker, self.lock, self.status, self.queue_lengths, package_version()
        )
        self.server = MetricsServer(
            address, self._render, self.status.health, web_config, liveness=self.status.liveness
        )

    def _render(self, kind: str) -> tuple[bytes, str]:
        if kind == PROTOBUF:
            return self.exposition.render_protobuf(), PROTOBUF_CONTENT_TYPE
        openmetrics = kind == OPENMETRICS
        body = self.exposition.render(openmetrics)
        return body, OPENMETRICS_CONTENT_TYPE if openmetrics else CONTENT_TYPE

    def connect(self, heartbeat: int = 10) -> Connection:
        url = self.config.broker_url
        driver = driver_of(Connection(url))  # no I/O: just which transport
        # Time out a broker that accepts the connection but never answers, instead of hanging.
        options = dict(_IO_TIMEOUTS.get(driver, {}))
        options.update(self.config.transport_options)
        return Connection(url, transport_options=options, connect_timeout=5, heartbeat=heartbeat)

    def connect_without_heartbeat(self) -> Connection:
        # The queue probe talks to the broker once per interval and sends nothing in between:
        # with AMQP heartbeats the broker would drop it between probes.
        return self.connect(heartbeat=0)

    def _queue_names(self) -> set[str]:
        with self.lock:
            seen = set(self.tracker.seen_queues)
        return seen | set(self.config.queues)

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> None:
        self.server.serve_in_thread()
        self.consumer.start()
        self.control.start()
        self.probe.start()
        log.info("watching %s; serving %s/metrics", self.config.safe_broker_url, self.url)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and every thread, all within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        self.server.shutdown()
        self.server.server_close()
        parts = (self.consumer, self.probe, self.control)
        for part in parts:  # signal every thread first, so they wind down together
            part.stop(timeout=0)
        for part in parts:
            part.stop(timeout=max(0.0, deadline - time.monotonic()))
