"""`install(app)`: JSON logs and lifecycle records for a Celery app, in one call.

Celery configures the worker's loggers itself (root and `celery.task`, hijacked or not); once it
has, the `after_setup_logger` / `after_setup_task_logger` signals hand us each logger and we put
the ECS JSON formatter and the task-context filter on its handlers. Celery's console handler
(stderr, when there is no `--logfile`) gives way to the chosen local outputs (`stdout` by
default), which are also added to loggers that have no handler; a `--logfile` handler stays.
So Celery's own lines, task loggers, plain `logging` and redirected `print` all come out as
JSON, and console.py turns the banner and the shutdown notices into JSON records too.
Network outputs (Logstash, Elasticsearch) get a shipping handler
on the same loggers. Every option is also a `celery_obs_log_*` setting and a `CELERY_OBS_LOG_*`
environment variable, so a deployment can change them without code.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from celery import Celery, signals
from celery.utils.log import get_multiprocessing_logger

from ..settings import Setting, SettingTable, csv, parse_bool, positive
from . import console, outputs
from .context import TaskContextFilter
from .formatter import EcsJsonFormatter
from .lifecycle import Lifecycle
from .redact import DEFAULT_PATTERNS, Redactor
from .shipper import ShippingHandler

ENV_PREFIX = "CELERY_OBS_LOG_"
#: app.conf keys: `celery_obs_log_output`, `celery_obs_log_service_name`, ...
CONF_PREFIX = "celery_obs_log_"


@dataclass(frozen=True)
class LogConfig:
    service_name: str = "celery"
    #: Comma-separated: stdout, stderr, file:PATH, http(s)://, tcp://, tls://,
    #: elasticsearch+http(s):// (see outputs.py).
    output: str = "stdout"
    #: None: the worker's own level (`celery worker -l`); lifecycle records are INFO.
    level: str | None = None
    include_args: bool = False
    redact: tuple[str, ...] = DEFAULT_PATTERNS
    max_value_length: int = 256
    file_max_bytes: int = 50 * 1024 * 1024
    file_backups: int = 5
    # Network outputs: credentials (also accepted inside the URL), TLS, spool, batching.
    username: str | None = None
    password: str | None = None
    api_key: str | None = None
    ca_certs: str | None = None
    verify_certs: bool = True
    #: None: `$TMPDIR/celery-obs-log-spool-<uid>`, looked up only when a network output needs
    #: it (`outputs.default_spool_root`): importing must work without a temporary directory.
    spool_dir: str | None = None
    spool_max_mb: int = 256
    flush_interval: float = 0.5
    data_stream: str = "logs-celery-default"
    extra: Mapping[str, Any] = field(default_factory=dict)


def _level(value: str | int) -> str:
    """INFO, info, 20 or logging.INFO: a level name, or ValueError."""
    name = logging.getLevelName(value) if isinstance(value, int) else str(value).strip().upper()
    if not isinstance(logging.getLevelName(name), int):
        raise ValueError(f"not a log level: {value!r}")
    return name


def _setting(name: str, default_shown: str, help: str, parse: Any = str, **more: Any) -> Setting:
    return Setting(
        name, help, None, parse, env=(ENV_PREFIX + name.upper(),), shown=default_shown, **more
    )


#: Settings a deployment may change without code: install() keyword arguments, `app.conf`
#: keys `celery_obs_log_<name>` and `CELERY_OBS_LOG_<NAME>` variables. docs/worker-logs.md's
#: table is this table's rendering.
SETTINGS = SettingTable(
    (
        _setting("service_name", "the app's main name", "`service.name` of every record."),
        _setting("output", "stdout", "Comma-separated outputs (see the outputs table)."),
        _setting(
            "level",
            "the worker's -l",
            "Level of the worker's loggers (lifecycle records are INFO, failures ERROR).",
            _level,
        ),
        _setting("include_args", "off", "Log task args/kwargs (redacted, truncated).", parse_bool),
        _setting(
            "redact",
            "password, passwd, secret, token, authorization, api_key, ...",
            "Comma-separated key patterns whose values are redacted (values are also scrubbed "
            "by shape: credentials in URLs, key=value pairs, bearer tokens).",
            csv,
        ),
        _setting("max_value_length", "256", "Longer argument values are cut.", positive(int)),
        _setting(
            "username",
            "none",
            "Basic auth for http(s) and Elasticsearch outputs (also accepted in the URL).",
        ),
        _setting("password", "none", "Basic auth password.", secret=True),
        _setting(
            "api_key",
            "none",
            "`Authorization: ApiKey ...` for http(s) and Elasticsearch outputs.",
            secret=True,
        ),
        _setting("ca_certs", "system CAs", "CA bundle for https, tls and Elasticsearch outputs."),
        _setting(
            "verify_certs",
            "on",
            "Off skips certificate checks (testing only); anything but true/false, yes/no, "
            "on/off, 1/0 is an error.",
            parse_bool,
        ),
        _setting(
            "spool_dir",
            "$TMPDIR/celery-obs-log-spool-<uid>",
            "Where undelivered batches wait (mode 0700); put it on a volume.",
        ),
        _setting("spool_max_mb", "256", "Per process and destination.", positive(int)),
        _setting(
            "flush_interval",
            "0.5",
            "Seconds between batches when fewer than 500 lines are queued.",
            positive(float),
        ),
        _setting("data_stream", "logs-celery-default", "Elasticsearch output: target data stream."),
    )
)
NAMES = frozenset(setting.name for setting in SETTINGS)


def _with(base: LogConfig, values: Mapping[str, Any]) -> LogConfig:
    return LogConfig(**{**base.__dict__, **{k: v for k, v in values.items() if v is not None}})


def config_from_env(environ: Mapping[str, str], base: LogConfig) -> LogConfig:
    """Environment variables override everything else."""
    return _with(base, SETTINGS.from_environ(environ))


def config_from_app(app: Celery | None, base: LogConfig) -> LogConfig:
    """`celery_obs_log_*` settings in app.conf override install()'s keyword arguments."""
    if app is None:
        return base
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        key = CONF_PREFIX + setting.name
        value = app.conf.get(key)
        if value is None:
            continue
        if setting.name == "redact" and not isinstance(value, str):
            value = tuple(value)
        elif setting.name == "level" or (isinstance(value, str) and setting.parse is not str):
            try:
                value = setting.parse(value)
            except ValueError as exc:
                raise ValueError(f"app.conf {key}: {exc}") from None
        values[setting.name] = value
    return _with(base, values)


def _is_celery_console(handler: logging.Handler) -> bool:
    """The handler Celery puts on its loggers when there is no --logfile: a plain
    StreamHandler on stderr (ours are marked; a --logfile handler is a file handler)."""
    return (
        type(handler) is logging.StreamHandler
        and not getattr(handler, "celery_obs_local", False)
        and handler.stream in (sys.__stderr__, sys.stderr)
    )


class JsonLogging:
    """Applies the formatter and filter to whatever loggers Celery sets up, and attaches the
    network shippers (one per network output, shared by every logger) to them."""

    def __init__(self, config: LogConfig) -> None:
        self.config = config
        # Secrets are taken out of every record, arguments logged or not.
        self.redactor = Redactor(config.redact, config.max_value_length)
        self.formatter = EcsJsonFormatter(service_name=config.service_name, redactor=self.redactor)
        self.filter = TaskContextFilter()
        specs = outputs.split_outputs(config.output)
        self.local = [spec for spec in specs if outputs.is_local(spec)]
        self.shippers: list[ShippingHandler] = []
        for spec in specs:
            if outputs.is_network(spec):
                shipper = outputs.make_shipping_handler(spec, config)
                shipper.setFormatter(self.formatter)
                shipper.addFilter(self.filter)
                self.shippers.append(shipper)

    def apply(self, logger: logging.Logger, **_: Any) -> None:
        if self.local:
            for handler in [h for h in logger.handlers if _is_celery_console(h)]:
                logger.removeHandler(handler)
        # Celery's loggers also hold a NullHandler (it keeps logging from printing "no handlers
        # could be found"): it writes nothing, so such a logger has no output yet.
        if all(isinstance(h, logging.NullHandler) for h in logger.handlers):
            for spec in self.local:
                handler = outputs.make_local_handler(spec, self.config)
                handler.celery_obs_local = True  # type: ignore[attr-defined]
                logger.addHandler(handler)
        for handler in logger.handlers:
            if isinstance(handler, ShippingHandler):
                continue
            handler.setFormatter(self.formatter)
            if self.filter not in handler.filters:
                handler.addFilter(self.filter)
        for shipper in self.shippers:
            if shipper not in logger.handlers:
                logger.addHandler(shipper)
        if self.config.level is not None:
            logger.setLevel(self.config.level)

    def apply_root(self, logger: logging.Logger, **kwargs: Any) -> None:
        self.apply(logger, **kwargs)
        # Celery gives the pool's multiprocessing logger a handler of its own ("Process
        # 'ForkPoolWorker-1' exited with signal 9") and sends no signal for it.
        pool_logger = get_multiprocessing_logger()
        if pool_logger.handlers:
            level = pool_logger.level
            self.apply(pool_logger)
            pool_logger.setLevel(level)

    def flush_shippers(self, **_: Any) -> None:
        """Worker (or pool child) shutting down: send what is queued, within a bounded time;
        what cannot be sent stays in the spool for the next start."""
        for shipper in self.shippers:
            shipper.close()

    def connect(self) -> None:
        console.connect(self.formatter)
        signals.after_setup_logger.connect(self.apply_root, weak=False)
        signals.after_setup_task_logger.connect(self.apply, weak=False)
        # Pool children leave through os._exit: no atexit, so logging.shutdown never runs.
        signals.worker_process_shutdown.connect(self.flush_shippers, weak=False)
        signals.worker_shutdown.connect(self.flush_shippers, weak=False)


_installed: list[tuple[JsonLogging, Lifecycle]] = []


def install(
    app: Celery | None = None,
    service_name: str | None = None,
    *,
    output: str | None = None,
    level: str | int | None = None,
    include_args: bool | None = None,
    redact: Iterable[str] | None = None,
    max_value_length: int | None = None,
    environ: Mapping[str, str] | None = None,
    **network: Any,
) -> LogConfig:
    """Turn the worker's logs into ECS JSON, log every task lifecycle step, and ship them.

    Call it once in the module that defines the Celery app, after its configuration. Settings
    come from, lowest first: the defaults, these keyword arguments (network ones too:
    `username`, `password`, `api_key`, `ca_certs`, `verify_certs`, `spool_dir`, `spool_max_mb`,
    `flush_interval`, `data_stream`), `celery_obs_log_*` keys in `app.conf`, and
    `CELERY_OBS_LOG_*` environment variables. Returns the config used. Calling it again is a
    no-op (it returns the first config).
    """
    if _installed:
        return _installed[0][0].config
    unknown = set(network) - NAMES
    if unknown:
        raise TypeError(f"install() got unknown settings: {', '.join(sorted(unknown))}")
    given = {
        "service_name": service_name or (app.main if app is not None and app.main else None),
        "output": output,
        "level": _level(level) if level is not None else None,
        "include_args": include_args,
        "redact": tuple(redact) if redact is not None else None,
        "max_value_length": max_value_length,
        **network,
    }
    config = _with(LogConfig(), given)
    config = config_from_app(app, config)
    config = config_from_env(os.environ if environ is None else environ, config)
    # A bad output fails here, at import, not in the worker.
    for spec in outputs.split_outputs(config.output):
        if outputs.is_local(spec):
            outputs.make_local_handler(spec, config).close()
    json_logging = JsonLogging(config)
    json_logging.connect()
    # Python warnings (Celery's own included) become log records, hence JSON, too.
    logging.captureWarnings(True)
    redactor = json_logging.redactor if config.include_args else None
    lifecycle = Lifecycle(redactor, level=logging.getLevelName(config.level or "INFO"))
    lifecycle.connect()
    _installed.append((json_logging, lifecycle))
    return config
