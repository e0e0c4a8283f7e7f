"""The exporter's commands: `exporter` (watch a cluster, serve /metrics) and `demo` (an embedded
cluster plus the exporter). The umbrella `celery-obs` command line (celery_obs.cli) registers
them with `add_commands` and calls `run`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

from .config import ExporterConfig, add_exporter_arguments, config_from_args
from .redis_link import BrokerUrlError
from .secrets import Scrubber, ScrubFilter
from .service import Exporter
from .webconfig import WebConfigError

log = logging.getLogger("celery_obs")


def add_commands(commands: Any, environ: Mapping[str, str]) -> None:
    exporter = commands.add_parser(
        "exporter",
        help="Consume the cluster's events and serve Prometheus metrics.",
        description="Consume a Celery cluster's events (celeryev) and serve Prometheus metrics "
        "on /metrics and a health check on /healthz.",
    )
    add_exporter_arguments(exporter, environ, broker_default=None)

    demo = commands.add_parser(
        "demo",
        help="Run an embedded demo cluster plus the exporter (no services needed).",
        description="Run an in-process worker and a small task load on the memory:// transport "
        "(or on --broker-url) together with the exporter.",
    )
    add_exporter_arguments(demo, {}, broker_default="memory://")
    demo.add_argument(
        "--tasks-per-second",
        type=float,
        default=10.0,
        metavar="N",
        help="Demo load: tasks sent per second [default 10]",
    )


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run the `exporter` or `demo` command parsed into `args`."""
    if args.command == "exporter" and not args.broker_url:
        parser.error(
            "exporter: --broker-url (or CELERY_OBS_BROKER_URL / CELERY_BROKER_URL) is required"
        )
    config = config_from_args(args)
    if hasattr(signal, "SIGHUP"):  # a SIGHUP while starting must not end the process either
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    setup_logging(config.log_level, config.scrubber())
    try:
        if args.command == "demo":
            return run_demo(config, args.tasks_per_second)
        return run_exporter(config)
    except StartupError as exc:
        print(f"celery-obs: {exc}", file=sys.stderr)
        return 2


def setup_logging(level: str, scrub: Scrubber | None = None) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if scrub is not None:  # on the handlers: they see every record, whichever logger sent it
        for handler in logging.getLogger().handlers:
            handler.addFilter(ScrubFilter(scrub))
    # kombu warns on every memory:// connection that no hostname was given; it means nothing here.
    logging.getLogger("kombu.connection").setLevel(logging.ERROR)


def wait_for_signal(on_hangup: Callable[[], object] | None = None) -> None:
    """Block until SIGTERM or SIGINT; on SIGHUP call `on_hangup` (reload) and keep waiting."""
    stop = threading.Event()
    wake = threading.Event()
    hangups: list[int] = []

    def handle(signum: int, _frame: object) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()
        wake.set()

    def hangup(_signum: int, _frame: object) -> None:
        # Only noted here: the reload runs in the loop below, outside the signal handler.
        hangups.append(1)
        wake.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    if hasattr(signal, "SIGHUP"):  # not on Windows
        signal.signal(signal.SIGHUP, hangup)  # its default action ends the process silently
    while not stop.is_set():
        wake.wait(1.0)
        wake.clear()
        while hangups and not stop.is_set():
            hangups.pop()
            log.info("received SIGHUP, reloading")
            try:
                if on_hangup is not None:
                    on_hangup()
            except Exception:  # a failed reload must not end a serving exporter
                log.exception("reloading on SIGHUP failed")


class StartupError(Exception):
    """A configuration problem found before anything started; the message is for the user."""


def start_exporter(config: ExporterConfig) -> Exporter:
    try:
        exporter = Exporter(config)
    except WebConfigError as exc:
        raise StartupError(f"invalid --web.config.file: {exc}") from None
    except OSError as exc:
        raise StartupError(f"cannot listen on {config.listen_address}: {exc}") from None
    except BrokerUrlError as exc:  # its message never quotes the URL
        raise StartupError(f"invalid broker URL {config.safe_broker_url}: {exc}") from None
    exporter.start()
    return exporter


def run_exporter(config: ExporterConfig) -> int:
    exporter = start_exporter(config)
    print(
        f"celery-obs exporter: watching {config.safe_broker_url}; "
        f"metrics at {exporter.url}/metrics",
        flush=True,
    )
    wait_for_signal(on_hangup=exporter.server.reload_web_config)
    exporter.stop()
    return 0


def what_next(url: str) -> str:
    return f"""
What next:
  - See the counters:       curl -s {url}/metrics | grep '^celery_task_'
  - Watch your own cluster: celery-obs exporter --broker-url redis://your-redis:6379/0
    (workers need events on: celery -A proj worker -E, and task_send_sent_event = True
    where tasks are published, for queue labels)
  - JSON logs from workers: from celery_obs import log_shipping; log_shipping.install(app)
  - Dashboards and alerts:  celery-obs assets export ./celery-obs-assets
  - Periodic task alerts:   celery-obs rules periodic your.nightly_task=26h
  - Everything else:        the README and docs/ of celery-observability
"""


def run_demo(config: ExporterConfig, tasks_per_second: float) -> int:
    from .demo import DEMO_QUEUES, DemoCluster

    config = ExporterConfig(**{**config.__dict__, "queues": config.queues or DEMO_QUEUES})
    if config.log_level != "debug":
        # The embedded worker logs every task (and the demo's deliberate failures) at INFO/ERROR.
        logging.getLogger("celery").setLevel(logging.CRITICAL)
    cluster = DemoCluster(config.broker_url, tasks_per_second=tasks_per_second)
    exporter = start_exporter(config)
    cluster.start()
    print(
        f"celery-obs demo: worker {cluster.hostname} running {tasks_per_second:g} tasks/s "
        f"on {config.safe_broker_url}",
        flush=True,
    )
    print(f"celery-obs demo: metrics at {exporter.url}/metrics (Ctrl-C to stop)", flush=True)
    print(what_next(exporter.url), flush=True)
    wait_for_signal(on_hangup=exporter.server.reload_web_config)
    cluster.stop()
    exporter.stop()
    return 0
