"""Where the worker's JSON lines go, from one `output` setting.

`output` is a comma-separated list; each entry is one of:

- `stdout`, `stderr`, `file:PATH` (rotated): local lines, for container log collectors and
  Filebeat. Used on loggers Celery left without a handler; where Celery has one (its stderr
  handler, or `--logfile`), that handler writes the JSON instead.
- `http://host:port/` or `https://...`: Logstash's `http` input, acknowledged batches.
- `tcp://host:port` or `tls://host:port`: Logstash's `tcp` input with `json_lines`.
- `elasticsearch+http://host:9200` or `elasticsearch+https://...`: an Elasticsearch data
  stream, through the bulk helpers.

Every network entry gets its own `ShippingHandler`, with its own spool directory; when that
directory cannot be used (no temporary directory, a read-only filesystem), the handler keeps
undelivered records in memory and says so once on stderr.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import ssl
import sys
import tempfile
import urllib.parse
from typing import TYPE_CHECKING

from .shipper import ShippingHandler
from .sinks import HttpSink, Sink, TcpSink, safe_url

if TYPE_CHECKING:
    from .hooks import LogConfig

LOCAL_OUTPUTS = ("stdout", "stderr")
ES_PREFIX = "elasticsearch+"
NETWORK_SCHEMES = ("http", "https", "tcp", "tls", ES_PREFIX + "http", ES_PREFIX + "https")


def split_outputs(output: str) -> list[str]:
    outputs = [part.strip() for part in output.split(",") if part.strip()]
    if not outputs:
        raise ValueError("log output is empty; use stdout, stderr, file:PATH or a URL")
    for spec in outputs:
        if not (is_local(spec) or is_network(spec)):
            raise ValueError(
                f"log output must be stdout, stderr, file:PATH, http(s)://, tcp://, tls:// or "
                f"elasticsearch+http(s):// URLs, got {safe_url(spec)!r}"
            )
    return outputs


def is_local(spec: str) -> bool:
    return spec in LOCAL_OUTPUTS or (spec.startswith("file:") and len(spec) > len("file:"))


def is_network(spec: str) -> bool:
    return urllib.parse.urlsplit(spec).scheme in NETWORK_SCHEMES


def make_local_handler(spec: str, config: LogConfig) -> logging.Handler:
    if spec.startswith("file:"):
        return logging.handlers.RotatingFileHandler(
            spec[len("file:") :],
            maxBytes=config.file_max_bytes,
            backupCount=config.file_backups,
            encoding="utf-8",
        )
    if spec in LOCAL_OUTPUTS:
        # sys.__stdout__: Celery redirects sys.stdout into logging; writing there would loop.
        return logging.StreamHandler(sys.__stdout__ if spec == "stdout" else sys.__stderr__)
    raise ValueError(f"not a local log output: {spec!r}")


def ssl_context(config: LogConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=config.ca_certs)
    if not config.verify_certs:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def make_sink(spec: str, config: LogConfig) -> Sink:
    scheme = urllib.parse.urlsplit(spec).scheme
    tls = ssl_context(config) if scheme.endswith(("https", "tls")) else None
    if scheme.startswith(ES_PREFIX):
        try:
            from .elastic import ElasticsearchSink  # the client loads only if used
        except ImportError as exc:  # the [elasticsearch] extra is not installed
            raise ValueError(
                f"output {spec!r} needs the Elasticsearch client ({exc}): pip install "
                "'celery-observability[elasticsearch]'"
            ) from None

        return ElasticsearchSink(
            spec,
            config.data_stream,
            username=config.username,
            password=config.password,
            api_key=config.api_key,
            ca_certs=config.ca_certs,
            verify_certs=config.verify_certs,
            timeout=5.0,  # within the shutdown flush's budget (ShippingHandler.close)
        )
    if scheme in ("tcp", "tls"):
        return TcpSink(spec, ssl_context=tls)
    return HttpSink(
        spec,
        username=config.username,
        password=config.password,
        api_key=config.api_key,
        ssl_context=tls,
    )


def spool_name(spec: str, data_stream: str = "") -> str:
    """A directory name per destination, without credentials: `http-logstash-8080`; for
    Elasticsearch the data stream too, so a spool never drains into another app's stream."""
    parsed = urllib.parse.urlsplit(spec)
    where = f"{parsed.scheme}-{parsed.hostname}-{parsed.port or ''}{parsed.path}"
    if parsed.scheme.startswith(ES_PREFIX):
        where += f"-{data_stream}"
    return re.sub(r"[^A-Za-z0-9.]+", "-", where).strip("-")


def default_spool_root() -> str | None:
    """`$TMPDIR/celery-obs-log-spool-<uid>` (per user: a directory another user made first in
    a shared /tmp must not catch ours), or None when no temporary directory is usable (a
    read-only root filesystem, as hardened containers run)."""
    try:
        return os.path.join(tempfile.gettempdir(), f"celery-obs-log-spool-{os.getuid()}")
    except OSError:  # FileNotFoundError: "No usable temporary directory found"
        return None


def usable_directory(path: str) -> OSError | None:
    """None when `path` is (or can be made) a directory we can write files in, else why not."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".probe-")  # noqa: SIM115
        probe.close()
    except OSError as exc:
        return exc
    return None


#: Spool problems already said in this process: each is said once on stderr, however many
#: outputs share the directory.
_said: set[str] = set()


def _say_once(message: str, config: LogConfig) -> None:
    """One JSON line on stderr: logging is not set up yet when install() runs."""
    if message in _said:
        return
    _said.add(message)
    from .formatter import EcsJsonFormatter

    record = logging.LogRecord(
        "celery_obs.log_shipping", logging.WARNING, __file__, 0, message, None, None
    )
    try:
        line = EcsJsonFormatter(service_name=config.service_name).format(record)
        print(line, file=sys.__stderr__, flush=True)
    except (OSError, ValueError):  # no stderr (closed, detached): nowhere left to say it
        pass


def spool_directory(spec: str, config: LogConfig) -> str | None:
    """Where this output's spool lives, or None (memory only, said once on stderr) when the
    directory cannot be used. Never raises: a worker must start without its spool."""
    root = config.spool_dir or default_spool_root()
    if root is None:
        _say_once(
            "no usable temporary directory for the log spool; undelivered records are kept "
            "in memory only (set CELERY_OBS_LOG_SPOOL_DIR to a writable volume)",
            config,
        )
        return None
    directory = os.path.join(root, spool_name(spec, config.data_stream))
    problem = usable_directory(directory)
    if problem is not None:
        _say_once(
            f"log spool directory {root} is unusable ({problem.strerror or problem}); "
            "undelivered records are kept in memory only",
            config,
        )
        return None
    return directory


def make_shipping_handler(spec: str, config: LogConfig) -> ShippingHandler:
    return ShippingHandler(
        make_sink(spec, config),
        spool_directory(spec, config),
        flush_interval=config.flush_interval,
        spool_max_bytes=config.spool_max_mb * 1024 * 1024,
    )
