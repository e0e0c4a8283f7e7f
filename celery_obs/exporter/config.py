"""The exporter's configuration: one frozen object, parsed once from flags and environment.

Every setting is declared once in `SETTINGS` (celery_obs.settings): its flag, its environment
variable (named after the flag: `--web.listen-address` is `CELERY_OBS_WEB_LISTEN_ADDRESS`; the
broker URL falls back to Celery's own `CELERY_BROKER_URL`), its type, default and help. A flag
given on the command line beats the environment, which beats the default. docs/exporter.md's
flag table is the table's own rendering (a test keeps it so).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..settings import (
    Setting,
    SettingTable,
    choice,
    csv,
    key_value,
    parse_bool,
    positive,
)
from .metrics import LATENCY_BUCKETS, QUEUE_WAIT_BUCKETS, RUNTIME_BUCKETS, BucketLayout
from .secrets import Scrubber, mask_url, option_secrets, url_secrets

ENV_PREFIX = "CELERY_OBS_"
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class Limits:
    """Bounds on memory and label cardinality, and the tracker's tolerances (see the flags)."""

    max_task_names: int = 500
    max_exceptions: int = 200
    max_queues: int = 200
    max_workers: int = 2000
    max_tracked_tasks: int = 100_000
    max_finished_tasks: int = 20_000
    #: How long a task's worker-side events wait for its task-sent (which may arrive later).
    sent_grace: float = 1.0
    #: Negative durations down to -this are taken as 0 without counting clock skew: task-sent
    #: is stamped after the publish, so a quick worker can start a task "before" it was sent.
    skew_tolerance: float = 1.0
    worker_timeout: float = 10.0
    worker_retention: float = 3600.0
    buckets: BucketLayout = field(default_factory=BucketLayout)


@dataclass(frozen=True)
class EventQueueOptions:
    prefix: str = "celeryev"
    #: RabbitMQ: the exporter's event queue; "" for `celeryev.celery-obs.<host>.<port>`.
    name: str = ""
    #: RabbitMQ: a restart within min(ttl, expires) finds every event published meanwhile.
    ttl: float = 300.0
    expires: float = 300.0
    max_length: int = 500_000
    #: RabbitMQ: most deliveries in flight unacknowledged.
    prefetch: int = 2000
    #: Redis: most bytes read off the socket but not yet processed (drain-first backlog).
    max_backlog_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True)
class ExporterConfig:
    broker_url: str
    transport_options: Mapping[str, Any] = field(default_factory=dict)
    listen_address: str = ":9808"
    web_config_file: str | None = None
    limits: Limits = field(default_factory=Limits)
    queues: tuple[str, ...] = ()
    queue_poll_interval: float = 15.0
    enable_events: bool = True
    enable_events_interval: float = 30.0
    event_queue: EventQueueOptions = field(default_factory=EventQueueOptions)
    log_level: str = "info"

    @property
    def safe_broker_url(self) -> str:
        """The broker URL with every credential masked: the only form that may be shown."""
        return mask_url(self.broker_url)

    def scrubber(self) -> Scrubber:
        """Masks the broker's credentials wherever they would be shown (logs, /healthz)."""
        return Scrubber(url_secrets(self.broker_url) | option_secrets(self.transport_options))


def parse_listen_address(address: str) -> tuple[str, int]:
    """`:9808`, `0.0.0.0:9808`, `[::1]:9808` -> (host, port); an empty host means all IPv4."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"listen address must be HOST:PORT or :PORT, got {address!r}")
    # An empty host is every IPv4 interface, as every Prometheus exporter listens.
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").upper().replace(".", "_").replace("-", "_")


def parse_buckets(text: str) -> tuple[float, ...]:
    try:
        buckets = tuple(float(item) for item in csv(text))
    except ValueError:
        raise ValueError(f"buckets must be numbers, got {text!r}") from None
    finite = all(math.isfinite(b) for b in buckets)
    if not buckets or not finite or list(buckets) != sorted(set(buckets)) or buckets[0] <= 0:
        raise ValueError(
            f"buckets must be finite, positive and increasing (+Inf is implied), got {text!r}"
        )
    return buckets


def _shown(bounds: tuple[float, ...]) -> str:
    return ",".join(f"{b:g}" for b in bounds)


def bucket_layout(args: argparse.Namespace) -> BucketLayout:
    """Each histogram's own flag, else --buckets, else its default layout."""
    default = BucketLayout()
    return BucketLayout(
        runtime=args.runtime_buckets or args.buckets or default.runtime,
        queue_wait=args.queue_wait_buckets or args.buckets or default.queue_wait,
        latency=args.latency_buckets or args.buckets or default.latency,
    )


def parse_address(text: str) -> str:
    parse_listen_address(text)
    return text


def _flag(name: str, flag: str, default: Any, help: str, parse: Any = str, **more: Any) -> Setting:
    env = (env_name(flag), *more.pop("extra_env", ()))
    return Setting(name, help, default, parse, flag=flag, env=env, **more)


_LIMITS = Limits()

#: Every flag of `celery-obs exporter` (and `demo`).
SETTINGS = SettingTable(
    (
        _flag(
            "broker_url",
            "--broker-url",
            None,
            "Broker of the cluster to watch, e.g. redis://host:6379/0 or "
            "amqp://user:pass@host:5672/vhost. Failover lists (url1;url2) and sentinel:// work.",
            metavar="URL",
            shown="(required)",
            extra_env=("CELERY_BROKER_URL",),
        ),
        Setting(
            "broker_transport_option",
            "kombu transport option, repeatable; values parsed as JSON when they can be "
            "(visibility_timeout=3600, master_name=mymaster, global_keyprefix=app:).",
            (),
            key_value,
            flag="--broker-transport-option",
            env=("CELERY_OBS_BROKER_TRANSPORT_OPTIONS",),
            metavar="KEY=VALUE",
            repeated=True,
        ),
        _flag(
            "listen_address",
            "--web.listen-address",
            ":9808",
            "Address to serve /metrics and /healthz on (:PORT means all IPv4 interfaces).",
            parse_address,
            metavar="HOST:PORT",
        ),
        _flag(
            "web_config_file",
            "--web.config.file",
            None,
            "Prometheus exporter-toolkit web config (TLS, basic auth), re-read on change.",
            metavar="PATH",
        ),
        _flag(
            "worker_timeout",
            "--worker-timeout",
            _LIMITS.worker_timeout,
            "Seconds without a heartbeat after which a worker is down (and lost, unless it "
            "said worker-offline).",
            positive(float),
            metavar="SECONDS",
        ),
        _flag(
            "worker_retention",
            "--worker-retention",
            _LIMITS.worker_retention,
            "Seconds a down worker's series stay at 0 before they are dropped.",
            positive(float),
            metavar="SECONDS",
        ),
        _flag(
            "queues",
            "--queues",
            (),
            "Comma-separated queues to report lengths for, besides those seen in task-sent events.",
            csv,
            metavar="A,B",
        ),
        _flag(
            "queue_poll_interval",
            "--queue-poll-interval",
            15.0,
            "Seconds between queue length probes.",
            positive(float),
            metavar="SECONDS",
        ),
        _flag(
            "runtime_buckets",
            "--runtime-buckets",
            None,
            "Comma-separated upper bounds (seconds) of the runtime histogram's buckets.",
            parse_buckets,
            metavar="S,S,...",
            shown=_shown(RUNTIME_BUCKETS),
        ),
        _flag(
            "queue_wait_buckets",
            "--queue-wait-buckets",
            None,
            "Comma-separated upper bounds (seconds) of the queue-wait histogram's buckets.",
            parse_buckets,
            metavar="S,S,...",
            shown=_shown(QUEUE_WAIT_BUCKETS),
        ),
        _flag(
            "latency_buckets",
            "--latency-buckets",
            None,
            "Comma-separated upper bounds (seconds) of the latency histogram's buckets.",
            parse_buckets,
            metavar="S,S,...",
            shown=_shown(LATENCY_BUCKETS),
        ),
        _flag(
            "buckets",
            "--buckets",
            None,
            "One bucket layout for all three histograms (each --*-buckets flag still wins "
            "for its own).",
            parse_buckets,
            metavar="S,S,...",
            shown="per histogram",
        ),
        _flag(
            "max_task_names",
            "--max-task-names",
            _LIMITS.max_task_names,
            'Distinct task names; more are counted as name="other".',
            positive(int),
            metavar="N",
        ),
        _flag(
            "max_exceptions",
            "--max-exceptions",
            _LIMITS.max_exceptions,
            'Distinct exception classes; more are counted as exception="other".',
            positive(int),
            metavar="N",
        ),
        _flag(
            "max_queues",
            "--max-queues",
            _LIMITS.max_queues,
            'Distinct queue names; more are counted as queue_name="other".',
            positive(int),
            metavar="N",
        ),
        _flag(
            "max_workers",
            "--max-workers",
            _LIMITS.max_workers,
            "Workers tracked; when full, the worker down longest makes room, and only when all "
            "are up are events from more ignored and counted.",
            positive(int),
            metavar="N",
        ),
        _flag(
            "max_tracked_tasks",
            "--max-tracked-tasks",
            _LIMITS.max_tracked_tasks,
            "Unfinished tasks remembered to label and pair their later events (oldest evicted, "
            "counted).",
            positive(int),
            metavar="N",
        ),
        _flag(
            "max_finished_tasks",
            "--max-finished-tasks",
            _LIMITS.max_finished_tasks,
            "Finished tasks remembered (about 0.8 kB each), so their late events are placed and "
            "redelivered ones not counted twice. The default is sized for a RabbitMQ prefetch "
            "window redelivered after a reconnect: 2000 messages of up to 24 events, ~12k tasks "
            "at 4 events each.",
            positive(int),
            metavar="N",
        ),
        _flag(
            "enable_events",
            "--enable-events",
            True,
            "Periodically ask workers to send task events, as Flower does.",
            parse_bool,
            negatable=True,
        ),
        _flag(
            "enable_events_interval",
            "--enable-events-interval",
            30.0,
            "Seconds between enable_events broadcasts.",
            positive(float),
            metavar="SECONDS",
        ),
        _flag(
            "event_queue_name",
            "--event-queue-name",
            None,
            "RabbitMQ: the exporter's event queue. Stable per exporter instance, so a restart "
            "finds it with every event published meanwhile (acknowledged deliveries, bounded "
            "prefetch: a stalled link or a crash loses nothing). Give each exporter its own: two "
            "sharing one take turns (single active consumer).",
            metavar="NAME",
            shown="celeryev.celery-obs.<host>.<port>",
        ),
        _flag(
            "event_queue_ttl",
            "--event-queue-ttl",
            300.0,
            "RabbitMQ: seconds an event may wait in the exporter's queue; a restart within this "
            "and the expiry loses nothing.",
            positive(float),
            metavar="SECONDS",
        ),
        _flag(
            "event_queue_expires",
            "--event-queue-expires",
            300.0,
            "RabbitMQ: the exporter's queue is deleted after this long without a consumer (it "
            "is kept when the exporter stops, for its restart).",
            positive(float),
            metavar="SECONDS",
        ),
        _flag(
            "event_queue_max_length",
            "--event-queue-max-length",
            500_000,
            "RabbitMQ: most events held in the exporter's queue (oldest dropped).",
            positive(int),
            metavar="N",
        ),
        _flag(
            "max_backlog_mb",
            "--max-backlog-mb",
            64,
            "Redis: memory for events read off the socket but not yet processed. Reading ahead "
            "keeps the server's pub/sub buffer, which disconnects a slow subscriber, near empty "
            "during bursts; past this bound the reader pauses.",
            positive(int),
            metavar="MB",
        ),
        _flag(
            "log_level",
            "--log-level",
            "info",
            f"One of {', '.join(LOG_LEVELS)}.",
            choice(*LOG_LEVELS),
            metavar="LEVEL",
        ),
    )
)


def add_exporter_arguments(
    parser: argparse.ArgumentParser, environ: Mapping[str, str], broker_default: str | None
) -> None:
    SETTINGS.add_arguments(parser, environ, broker_url=broker_default)


def config_from_args(args: argparse.Namespace) -> ExporterConfig:
    return ExporterConfig(
        broker_url=args.broker_url,
        transport_options=dict(args.broker_transport_option),
        listen_address=args.listen_address,
        web_config_file=args.web_config_file,
        limits=Limits(
            max_task_names=args.max_task_names,
            max_exceptions=args.max_exceptions,
            max_queues=args.max_queues,
            max_workers=args.max_workers,
            max_tracked_tasks=args.max_tracked_tasks,
            max_finished_tasks=args.max_finished_tasks,
            worker_timeout=args.worker_timeout,
            worker_retention=args.worker_retention,
            buckets=bucket_layout(args),
        ),
        queues=args.queues,
        queue_poll_interval=args.queue_poll_interval,
        enable_events=args.enable_events,
        enable_events_interval=args.enable_events_interval,
        event_queue=EventQueueOptions(
            name=args.event_queue_name or "",
            ttl=args.event_queue_ttl,
            expires=args.event_queue_expires,
            max_length=args.event_queue_max_length,
            max_backlog_bytes=args.max_backlog_mb * 1024 * 1024,
        ),
        log_level=args.log_level,
    )
