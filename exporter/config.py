"""The exporter's configuration: one frozen object, parsed once from flags and environment.

Every flag can also be set by an environment variable named after it: `--web.listen-address` is
`CELERY_OBS_WEB_LISTEN_ADDRESS`; the broker URL falls back to celery's own `CELERY_BROKER_URL`.
A flag given on the command line beats the environment, which beats the default.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .metrics import DEFAULT_BUCKETS
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
    buckets: tuple[float, ...] = DEFAULT_BUCKETS


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
    return host.strip("[]") or "0.0.0.0", int(port)


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").upper().replace(".", "_").replace("-", "_")


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def parse_csv(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def parse_buckets(text: str) -> tuple[float, ...]:
    try:
        buckets = tuple(float(item) for item in parse_csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"buckets must be numbers, got {text!r}") from None
    finite = all(math.isfinite(b) for b in buckets)
    if not buckets or not finite or list(buckets) != sorted(set(buckets)) or buckets[0] <= 0:
        raise argparse.ArgumentTypeError(
            f"buckets must be finite, positive and increasing (+Inf is implied), got {text!r}"
        )
    return buckets


def parse_transport_option(text: str) -> tuple[str, Any]:
    """`key=value`; the value is JSON when it parses as JSON (numbers, booleans, lists)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"transport option must be key=value, got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_log_level(text: str) -> str:
    if text.lower() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"log level must be one of {', '.join(LOG_LEVELS)}")
    return text.lower()


def parse_address(text: str) -> str:
    try:
        parse_listen_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


class _EnvDefaults:
    """Adds flags whose default comes from the environment, and says so in --help."""

    def __init__(self, parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
        self.parser = parser
        self.environ = environ

    def add(
        self,
        flag: str,
        *,
        default: Any,
        help: str,
        type: Callable[[str], Any] = str,
        env: tuple[str, ...] = (),
        metavar: str | None = None,
    ) -> None:
        names = (env_name(flag), *env)
        value = default
        for name in names:
            if self.environ.get(name):
                try:
                    value = type(self.environ[name])
                except (argparse.ArgumentTypeError, ValueError) as exc:
                    self.parser.error(f"environment variable {name}: {exc}")
                break
        shown = "(none)" if default is None else default
        if isinstance(default, tuple):
            shown = ",".join(str(d) for d in default) or "(none)"
        self.parser.add_argument(
            flag,
            default=value,
            type=type,
            metavar=metavar,
            help=f"{help} [env {' or '.join(names)}; default {shown}]",
        )


def add_exporter_arguments(
    parser: argparse.ArgumentParser, environ: Mapping[str, str], broker_default: str | None
) -> None:
    env = _EnvDefaults(parser, environ)
    broker_env = ("CELERY_BROKER_URL",) if broker_default is None else ()
    env.add(
        "--broker-url",
        default=broker_default,
        env=broker_env,
        metavar="URL",
        help="Broker of the cluster to watch, e.g. redis://host:6379/0 or amqp://user:pass@host//.",
    )
    options = [
        parse_transport_option(item)
        for item in environ.get(env_name("--broker-transport-options"), "").split()
    ]
    parser.add_argument(
        "--broker-transport-option",
        dest="broker_transport_option",
        action="append",
        type=parse_transport_option,
        default=options,
        metavar="KEY=VALUE",
        help="kombu transport option, repeatable (values parsed as JSON when they can be), "
        "e.g. master_name=mymaster [env CELERY_OBS_BROKER_TRANSPORT_OPTIONS, space separated]",
    )
    env.add(
        "--web.listen-address",
        default=":9808",
        type=parse_address,
        metavar="HOST:PORT",
        help="Address to serve /metrics and /healthz on.",
    )
    env.add(
        "--web.config.file",
        default=None,
        metavar="PATH",
        help="Prometheus exporter-toolkit web config (TLS, basic auth) to serve with.",
    )
    env.add(
        "--worker-timeout",
        default=10.0,
        type=_positive(float),
        metavar="SECONDS",
        help="A worker with no heartbeat for this long is reported down.",
    )
    env.add(
        "--worker-retention",
        default=3600.0,
        type=_positive(float),
        metavar="SECONDS",
        help="How long a down worker's series stay at 0 before they are dropped.",
    )
    env.add(
        "--queues",
        default=(),
        type=parse_csv,
        metavar="A,B",
        help="Queues whose length to report, besides those seen in task-sent events.",
    )
    env.add(
        "--queue-poll-interval",
        default=15.0,
        type=_positive(float),
        metavar="SECONDS",
        help="How often queue lengths are read from the broker.",
    )
    env.add(
        "--buckets",
        default=DEFAULT_BUCKETS,
        type=parse_buckets,
        metavar="S,S,...",
        help="Histogram buckets in seconds for runtime, queue wait and latency.",
    )
    limits = Limits()
    for flag, attr, what in (
        ("--max-task-names", "max_task_names", "task names"),
        ("--max-exceptions", "max_exceptions", "exception classes"),
        ("--max-queues", "max_queues", "queue names"),
    ):
        env.add(
            flag,
            default=getattr(limits, attr),
            type=_positive(int),
            metavar="N",
            help=f"Distinct {what} reported; more are counted under 'other'.",
        )
    env.add(
        "--max-workers",
        default=limits.max_workers,
        type=_positive(int),
        metavar="N",
        help="Workers tracked; events from more are ignored and counted.",
    )
    env.add(
        "--max-tracked-tasks",
        default=limits.max_tracked_tasks,
        type=_positive(int),
        metavar="N",
        help="Unfinished tasks remembered for labelling (oldest evicted, counted).",
    )
    env.add(
        "--enable-events-interval",
        default=30.0,
        type=_positive(float),
        metavar="SECONDS",
        help="How often workers are asked to enable task events.",
    )
    env.add(
        "--event-queue-name",
        default=None,
        metavar="NAME",
        help="RabbitMQ: the exporter's event queue. It is kept across restarts (events "
        "published while the exporter is down wait in it); give each exporter its own. "
        "Default: celeryev.celery-obs.<hostname>.<listen port>.",
    )
    env.add(
        "--event-queue-ttl",
        default=300.0,
        type=_positive(float),
        metavar="SECONDS",
        help="RabbitMQ: how long events wait in the exporter's queue.",
    )
    env.add(
        "--event-queue-expires",
        default=300.0,
        type=_positive(float),
        metavar="SECONDS",
        help="RabbitMQ: the exporter's event queue is deleted after this long unused.",
    )
    env.add(
        "--event-queue-max-length",
        default=500_000,
        type=_positive(int),
        metavar="N",
        help="RabbitMQ: most events held in the exporter's queue (oldest dropped).",
    )
    env.add(
        "--max-backlog-mb",
        default=64,
        type=_positive(int),
        metavar="MB",
        help="Redis: memory for events read off the socket but not yet processed; past it "
        "the reader pauses and a burst waits in the server's pub/sub buffer.",
    )
    env.add(
        "--log-level",
        default="info",
        type=parse_log_level,
        metavar="LEVEL",
        help=f"One of {', '.join(LOG_LEVELS)}.",
    )
    enable = environ.get(env_name("--enable-events"))
    parser.add_argument(
        "--enable-events",
        action=argparse.BooleanOptionalAction,
        default=parse_bool(enable) if enable else True,
        help="Periodically ask workers to send task events, as Flower does "
        "[env CELERY_OBS_ENABLE_EVENTS; default on]",
    )


def config_from_args(args: argparse.Namespace) -> ExporterConfig:
    return ExporterConfig(
        broker_url=args.broker_url,
        transport_options=dict(args.broker_transport_option),
        listen_address=getattr(args, "web.listen_address"),
        web_config_file=getattr(args, "web.config.file"),
        limits=Limits(
            max_task_names=args.max_task_names,
            max_exceptions=args.max_exceptions,
            max_queues=args.max_queues,
            max_workers=args.max_workers,
            max_tracked_tasks=args.max_tracked_tasks,
            worker_timeout=args.worker_timeout,
            worker_retention=args.worker_retention,
            buckets=args.buckets,
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
