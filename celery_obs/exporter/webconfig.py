"""Load a Prometheus exporter-toolkit `web-config.yml` (TLS, bcrypt basic-auth users, headers)
and keep it current while the exporter runs.

Users know this file from node_exporter and friends, so the same keys mean the same things:

    tls_server_config:
      cert_file: server.crt          # relative paths are relative to this file
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert   # optional, with client_ca_file
      client_ca_file: ca.crt
      min_version: TLS12
    http_server_config:
      headers: {X-Frame-Options: deny}
    basic_auth_users:
      alice: $2y$10$...               # bcrypt hash (htpasswd -nBC 10 "" | tr -d ':\\n')

Anything malformed is a `WebConfigError` saying file, key and problem: at startup it stops the
exporter; at a reload (`WebConfigWatcher`) it is logged once and the previous config stays in force.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

log = logging.getLogger(__name__)

_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "RequireClientCert": ssl.CERT_REQUIRED,  # the toolkit's old name for RequireAnyClientCert
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
# Go-specific knobs Python's ssl module does not map one to one: accepted, and ignored loudly.
_IGNORED_TLS_KEYS = {"cipher_suites", "curve_preferences", "prefer_server_cipher_suites"}
_TLS_KEYS = {
    "cert_file",
    "key_file",
    "client_auth_type",
    "client_ca_file",
    "min_version",
    "max_version",
    *_IGNORED_TLS_KEYS,
}
_TOP_KEYS = {"tls_server_config", "http_server_config", "basic_auth_users"}
#: A web config is a few lines; anything bigger is a mistake (or an attack) read into memory.
MAX_FILE_BYTES = 1 << 20

# Modular crypt format: $2a|2b|2y$, a two-digit cost, 22 salt and 31 digest characters of
# bcrypt's base64. The last character of each carries padding bits, so only some are possible:
# a hash ending otherwise was edited or truncated and can never match (or is refused by bcrypt).
_BCRYPT_ALPHABET = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_BCRYPT_PREFIX = re.compile(r"\$2[aby]\$")
_BCRYPT = re.compile(
    r"\$2[aby]\$(?P<cost>\d\d)\$[./A-Za-z0-9]{21}[.Oeu][./A-Za-z0-9]{30}[.CGKOSWaeimquy26]"
)
BCRYPT_MIN_COST, BCRYPT_MAX_COST = 4, 31
_SLOW_COST = 14  # ~1 s per check on one core: each login (and each wrong one) costs that much

# RFC 9110 field names are tokens; values are visible ASCII, spaces and tabs.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(r"[\x20-\x7e\t]*")
#: Response headers the server sets itself: configuring one would corrupt or contradict it.
SERVER_HEADERS = frozenset(
    {
        "allow",
        "connection",
        "content-encoding",
        "content-length",
        "content-type",
        "date",
        "keep-alive",
        "proxy-connection",
        "server",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "vary",
        "www-authenticate",
    }
)

#: (path, device, inode, size, mtime_ns) of a file a config was read from; all -1 if missing.
FileStamp = tuple[str, int, int, int, int]


class WebConfigError(ValueError):
    """The web config file cannot be used; the message says which file, which key, what is wrong.

    `files` are the stamps of the files read before the problem was found, so that a watcher
    can retry when one of them changes (and only then).
    """

    def __init__(self, message: str, files: tuple[FileStamp, ...] = ()) -> None:
        super().__init__(message)
        self.files = files


@dataclass(frozen=True)
class WebConfig:
    ssl_context: ssl.SSLContext | None = None
    basic_auth_users: dict[str, bytes] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    #: The file this was read from (None: made in code, never reloaded).
    path: str | None = None
    #: Every file read to make it (the config, certificate, key, CA), as stamped before reading.
    files: tuple[FileStamp, ...] = ()


def stamp(path: str) -> FileStamp:
    try:
        st = os.stat(path)
    except OSError:
        return (path, -1, -1, -1, -1)
    return (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def restamp(files: tuple[FileStamp, ...]) -> tuple[FileStamp, ...]:
    return tuple(stamp(path) for path, *_ in files)


def bcrypt_cost(hashed: bytes) -> int:
    return int(hashed[4:6])


class _Refused(yaml.MarkedYAMLError):
    """YAML that parses but that a web config must not use."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader without anchors/aliases (no alias bombs) and without duplicate keys (Go's
    UnmarshalStrict, which the exporter-toolkit uses, refuses them too)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused(
                problem="YAML anchors and aliases (&name, *name) are not allowed",
                problem_mark=event.start_mark,
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise _Refused(
                        problem=f"duplicate key {key!r}", problem_mark=key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _Reader:
    """Reads one web config, stamping every file it reads (before reading it)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.base = os.path.dirname(os.path.abspath(path))
        self.files: list[FileStamp] = []

    def error(self, message: str) -> WebConfigError:
        return WebConfigError(f"{self.path}: {message}", tuple(self.files))

    def file(self, name: str) -> str:
        path = os.path.join(self.base, name)
        self.files.append(stamp(path))
        return path

    def yaml(self) -> Any:
        self.files.append(stamp(self.path))
        try:
            with open(self.path, "rb") as handle:
                data = handle.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise self.error(f"cannot read web config: {exc.strerror}") from None
        if len(data) > MAX_FILE_BYTES:
            raise self.error(f"web config is larger than {MAX_FILE_BYTES} bytes")
        try:
            # _StrictLoader is a SafeLoader subclass (no objects), stricter still (no aliases).
            return yaml.load(data.decode("utf-8"), Loader=_StrictLoader)  # noqa: S506
        except UnicodeDecodeError:
            raise self.error("web config is not UTF-8 text") from None
        except _Refused as exc:
            raise self.error(f"{_where(exc)}: {exc.problem}") from None
        except yaml.MarkedYAMLError as exc:
            raise self.error(f"not valid YAML: {_where(exc)}: {exc.problem}") from None
        except yaml.YAMLError as exc:
            raise self.error(f"not valid YAML: {exc}") from None
        except RecursionError:
            raise self.error("not valid YAML: nested too deeply") from None

    def mapping(self, value: Any, where: str, allowed: set[str] | None = None) -> dict[Any, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(f"{where} must be a mapping, got {type(value).__name__}")
        unknown = sorted(str(key) for key in set(value) - allowed) if allowed is not None else []
        if unknown:
            raise self.error(f"unknown key(s) in {where}: {', '.join(unknown)}")
        return value

    def string(self, section: dict[str, Any], key: str, where: str) -> str | None:
        value = section.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.error(f"{where}.{key} must be a string, got {type(value).__name__}")
        return value


def _where(exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"


def _ssl_context(reader: _Reader, tls: dict[str, Any]) -> ssl.SSLContext:
    section = "tls_server_config"
    cert = reader.string(tls, "cert_file", section)
    key = reader.string(tls, "key_file", section)
    if not cert or not key:
        raise reader.error(f"{section} needs both cert_file and key_file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert, key = reader.file(cert), reader.file(key)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise reader.error(f"cannot load cert_file {cert} / key_file {key}: {exc}") from None
    for name, attribute in (("min_version", "minimum_version"), ("max_version", "maximum_version")):
        version = reader.string(tls, name, section)
        if version is not None:
            if version not in _TLS_VERSIONS:
                raise reader.error(f"{name} must be one of {', '.join(_TLS_VERSIONS)}")
            setattr(context, attribute, _TLS_VERSIONS[version])
    auth_type = reader.string(tls, "client_auth_type", section) or "NoClientCert"
    if auth_type not in _CLIENT_AUTH:
        raise reader.error(f"client_auth_type must be one of {', '.join(_CLIENT_AUTH)}")
    context.verify_mode = _CLIENT_AUTH[auth_type]
    ca = reader.string(tls, "client_ca_file", section)
    if ca and auth_type == "NoClientCert":
        raise reader.error("client_ca_file is set but client_auth_type asks for no client cert")
    if ca:
        ca = reader.file(ca)
        try:
            context.load_verify_locations(ca)
        except (OSError, ssl.SSLError) as exc:
            raise reader.error(f"cannot load client_ca_file {ca}: {exc}") from None
    elif auth_type != "NoClientCert":
        # Go's RequestClientCert/RequireAnyClientCert accept any certificate unverified;
        # Python's TLS always verifies one it asks for, so every mode needs the CA to do so.
        raise reader.error(
            f"client_auth_type {auth_type} needs client_ca_file "
            "(client certificates are always verified here)"
        )
    for ignored in sorted(_IGNORED_TLS_KEYS & set(tls)):
        log.warning(
            "%s: tls_server_config.%s is not supported and is ignored", reader.path, ignored
        )
    return context


def _bcrypt_problem(hashed: Any) -> str | None:
    """What is wrong with a bcrypt hash, or None if it is well formed."""
    if not isinstance(hashed, str) or not _BCRYPT_PREFIX.match(hashed):
        return "not a bcrypt hash (want $2y$, $2b$ or $2a$, a cost, $ and 53 characters)"
    cost = hashed[4:6]
    if not (cost.isdigit() and hashed[6:7] == "$"):
        return "no two-digit bcrypt cost after the $2y$ prefix"
    if not BCRYPT_MIN_COST <= int(cost) <= BCRYPT_MAX_COST:
        return f"bcrypt cost must be {BCRYPT_MIN_COST}..{BCRYPT_MAX_COST}, got {int(cost)}"
    if len(hashed) != 60:
        return f"a bcrypt hash is 60 characters long, this one {len(hashed)} (truncated?)"
    if any(char not in _BCRYPT_ALPHABET for char in hashed[7:]):
        return "characters outside bcrypt's base64 alphabet (./A-Za-z0-9)"
    if not _BCRYPT.fullmatch(hashed):
        return "damaged bcrypt hash: its salt or digest does not decode"
    return None


def _users(reader: _Reader, users: dict[Any, Any]) -> dict[str, bytes]:
    hashes = {}
    for user, hashed in users.items():
        if isinstance(user, bool) or not isinstance(user, (str, int)):
            raise reader.error(f"basic_auth_users: user name {user!r} must be a string")
        name = str(user)
        if ":" in name or not _FIELD_VALUE.fullmatch(name):
            raise reader.error(
                f"basic_auth_users: user name {name!r} cannot hold ':' or control characters"
            )
        problem = _bcrypt_problem(hashed)
        if problem is not None:
            raise reader.error(f"basic_auth_users.{name}: {problem}")
        hashes[name] = hashed.encode()
    costs = sorted({bcrypt_cost(hashed) for hashed in hashes.values()})
    if len(costs) > 1:
        log.warning(
            "%s: basic_auth_users have different bcrypt costs %s: unknown users are checked at "
            "the highest, so a wrong password for a cheaper user answers faster (use one cost)",
            reader.path,
            costs,
        )
    if costs and costs[-1] >= _SLOW_COST:
        log.warning(
            "%s: bcrypt cost %d makes every password check take about a second or more",
            reader.path,
            costs[-1],
        )
    return hashes


def _headers(reader: _Reader, headers: dict[Any, Any]) -> dict[str, str]:
    checked: dict[str, str] = {}
    lowered: set[str] = set()
    for name, value in headers.items():
        if not isinstance(name, str) or not _TOKEN.fullmatch(name):
            raise reader.error(f"http_server_config.headers: {name!r} is not a valid header name")
        where = f"http_server_config.headers.{name}"
        if name.lower() in SERVER_HEADERS:
            raise reader.error(f"{where}: the server sets this header itself")
        if name.lower() in lowered:
            raise reader.error(f"{where}: given twice (header names ignore case)")
        lowered.add(name.lower())
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise reader.error(f"{where} must be a string, got {type(value).__name__}")
        text = str(value)
        if any(char in text for char in "\r\n\0"):
            raise reader.error(f"{where}: the value holds CR, LF or NUL (header injection)")
        if not _FIELD_VALUE.fullmatch(text):
            raise reader.error(f"{where}: the value must be printable ASCII")
        checked[name] = text.strip(" \t")
    return checked


def load_web_config(path: str) -> WebConfig:
    reader = _Reader(path)
    config = reader.mapping(reader.yaml(), "the web config", _TOP_KEYS)
    tls = reader.mapping(config.get("tls_server_config"), "tls_server_config", _TLS_KEYS)
    http = reader.mapping(
        config.get("http_server_config"), "http_server_config", {"headers", "http2"}
    )
    if not isinstance(http.get("http2", False), bool):
        raise reader.error("http_server_config.http2 must be true or false")
    headers = reader.mapping(http.get("headers"), "http_server_config.headers")
    users = reader.mapping(config.get("basic_auth_users"), "basic_auth_users")
    return WebConfig(
        ssl_context=_ssl_context(reader, tls) if tls else None,
        basic_auth_users=_users(reader, users),
        headers=_headers(reader, headers),
        path=path,
        files=tuple(reader.files),
    )


class WebConfigWatcher:
    """The web config in force: re-read when a file it came from changes, or on `reload()`.

    `current()` looks for changes (stat of the config, certificate, key and CA files) at most
    once per `interval`, in the calling thread; callers that find another thread reloading keep
    the config they have. A reload that fails keeps the previous config and logs why, once: the
    failed attempt's files are watched, and only a change to them is tried again.
    """

    def __init__(
        self,
        config: WebConfig,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        load: Callable[[str], WebConfig] = load_web_config,
    ) -> None:
        self._config = config
        self._watched = config.files
        self._interval = interval
        self._clock = clock
        self._load = load
        self._next_check = clock() + interval
        self._lock = threading.Lock()

    def current(self) -> WebConfig:
        config = self._config
        if config.path is None or self._clock() < self._next_check:
            return config
        if not self._lock.acquire(blocking=False):
            return config
        try:
            self._next_check = self._clock() + self._interval
            if restamp(self._watched) != self._watched:
                self._reload()
        finally:
            self._lock.release()
        return self._config

    def reload(self) -> bool:
        """Re-read now (SIGHUP), changed or not; False if it failed or there is no file."""
        if self._config.path is None:
            log.info("no web config file to reload")
            return False
        with self._lock:
            return self._reload()

    def _reload(self) -> bool:
        old = self._config
        if old.path is None:  # a config built in code, not read from a file: nothing to reread
            return False
        try:
            new = self._load(old.path)
            if (new.ssl_context is None) != (old.ssl_context is None):
                raise WebConfigError(
                    f"{old.path}: tls_server_config was added or removed; switching between "
                    "HTTP and HTTPS needs a restart",
                    new.files,
                )
        except WebConfigError as exc:
            self._watched = exc.files or restamp(self._watched)
            log.error("web config not reloaded, the previous one stays in force: %s", exc)
            return False
        self._config, self._watched = new, new.files
        log.info("web config reloaded from %s", old.path)
        return True
