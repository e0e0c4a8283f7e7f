"""Subscribe to Celery's event channel on Redis ourselves, from the broker URL and transport
options alone: no kombu channel internals, so every kombu and redis-py version we admit runs
the same fast path.

The wire format is Celery's and Redis', not kombu's internals: kombu publishes a fanout message
to the pub/sub channel `<global_keyprefix><fanout prefix>celeryev/<routing key>`, where the
fanout prefix is `/<db>.` by default (`fanout_prefix`; a string of its own, or none), and the
routing key is dropped when `fanout_patterns` is off. So the exporter connects (TCP, TLS or a
unix socket; a sentinel is asked for the master with redis-py's public Sentinel), authenticates,
and PSUBSCRIBEs to that pattern. Nothing is written to the user's Redis: no binding, no key.

kombu before 5.4 never put the database number into a sentinel's fanout prefix: on a sentinel
URL the literal `/{db}.` channel is subscribed to as well, so older workers are heard too.
"""

from __future__ import annotations

import inspect
import logging
import re
import socket
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from kombu import Connection
from kombu.utils.url import parse_url

from .transports import driver_of, driver_of_alias

log = logging.getLogger(__name__)

EVENT_EXCHANGE = "celeryev"
#: The exchange of Celery's remote control (its default `control_exchange` plus ".pidbox").
CONTROL_EXCHANGE = "celery.pidbox"
_DEFAULT_PORT = 6379


class RedisRefused(ConnectionError):
    """Redis answered a command of ours with an error (a wrong password, an ACL)."""


class ReplyError(Exception):
    """An error reply (`-ERR ...`), returned in place of the command's reply, not raised."""


class BrokerUrlError(ValueError):
    """A Redis broker URL kombu would not accept either. The message never quotes the URL,
    which can hold a password: the caller shows the masked URL beside it."""


@dataclass(frozen=True)
class RedisSettings:
    host: str = "127.0.0.1"
    port: int = _DEFAULT_PORT
    path: str | None = None  # a unix socket instead of host and port
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: Mapping[str, Any] | None = None  # kombu's ssl options; {} for defaults
    sentinels: tuple[tuple[str, int], ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)
    #: The other servers of a failover list (`redis://a;redis://b`), tried in order when this
    #: one cannot be reached, as kombu fails over.
    fallbacks: tuple[RedisSettings, ...] = ()

    @property
    def topics(self) -> list[str]:
        """The channel patterns kombu publishes Celery's events to, for any kombu version."""
        routing = "/*" if self.options.get("fanout_patterns", True) else ""
        return self.fanout_channels(EVENT_EXCHANGE, routing)

    @property
    def control_channels(self) -> list[str]:
        """The channels a broadcast to the workers goes to (its routing key is empty, so
        `fanout_patterns` adds nothing); with kombu < 5.4 on a sentinel, each worker listens
        on one of two, and a message reaches a worker once either way."""
        return self.fanout_channels(CONTROL_EXCHANGE, "")

    def key(self, name: str) -> str:
        """A key as kombu names it: with the `global_keyprefix` transport option in front."""
        return f"{self.options.get('global_keyprefix', '') or ''}{name}"

    def fanout_channels(self, exchange: str, routing: str) -> list[str]:
        options = self.options
        prefix = options.get("fanout_prefix", True)
        if prefix is True:
            prefixes = [f"/{self.db}."]
            if self.sentinels:
                prefixes.append("/{db}.")  # kombu < 5.4 on sentinel: never formatted
        elif isinstance(prefix, str):
            prefixes = [prefix.replace("{db}", str(self.db))]
        else:
            prefixes = [""]
        return [self.key(f"{p}{exchange}{routing}") for p in dict.fromkeys(prefixes)]


def _db(virtual_host: object) -> int:
    text = str(virtual_host or "").strip("/")
    if text and not (text.isascii() and text.isdigit()):  # kombu's transport refuses it too
        raise BrokerUrlError("the database (the URL's path) must be a number")
    return int(text or 0)


def settings_for(connection: Connection) -> RedisSettings | None:
    """What to connect to, from kombu's public connection attributes; None if not Redis."""
    if driver_of(connection) != "redis":
        return None
    scheme = connection.transport_cls if isinstance(connection.transport_cls, str) else ""
    return _settings(
        scheme,
        connection.hostname,
        connection.port,
        connection.userid,
        connection.password,
        connection.virtual_host,
        connection.ssl,
        connection.alt or [connection.as_uri(include_password=True)],
        connection.transport_options,
    )


def settings_for_url(url: str, options: Mapping[str, Any]) -> RedisSettings | None:
    """`settings_for(Connection(url, transport_options=options))`, without the Connection.

    kombu's Connection imports the transport's module to parse a URL, and its Redis module
    imports redis-py (~10 MB resident, which the exporter does not use on Redis). This splits
    the URL as the Connection does (`;` between failover URLs, `redis+socket://`, kombu's own
    `parse_url`); a test holds the two to the same result for every URL form. A Redis URL
    kombu cannot read raises BrokerUrlError, whose message is safe to show.
    """
    try:
        return _settings_for_url(url, options)
    except BrokerUrlError:
        raise
    except Exception as exc:  # kombu's own parsing: its message may quote a password
        raise BrokerUrlError(_why_unreadable(url, exc)) from None


#: What a URL may set, as kombu's Connection reads it (each a parameter of its `_init_params`).
_URL_OPTIONS = frozenset(inspect.signature(Connection._init_params).parameters) - {"self"}


def _why_unreadable(url: str, exc: Exception) -> str:
    """Why kombu refused the URL, in words that never quote any of it but a keyword name."""
    repeated = re.search(r"multiple values for keyword argument '(\w+)'", str(exc))
    if repeated:  # `redis://h/0?virtual_host=1`: the path already is the virtual host
        return f"it sets {repeated.group(1)} twice (in the URL and again in its query string)"
    hint = " (a ';' separates failover URLs: write one in a password as %3B)" if ";" in url else ""
    return f"kombu cannot read it ({type(exc).__name__}){hint}"


def _settings_for_url(url: str, options: Mapping[str, Any]) -> RedisSettings | None:
    alternates = url.split(";")
    first = alternates[0]
    before, found, _ = first.partition("://")
    if not found:
        return None
    if "+" in before:  # redis+socket:///path: kombu keeps the socket URL as the hostname
        alias, hostname = first.split("+", 1)
        if driver_of_alias(alias) != "redis":
            return None
        return _settings(alias, hostname, None, None, None, None, None, alternates, options)
    parts = parse_url(first)  # as kombu reads it: the scheme lower-cased, spaces stripped
    scheme = parts.pop("transport")
    if driver_of_alias(scheme) != "redis":
        return None
    unknown = sorted(set(parts) - _URL_OPTIONS)
    if unknown:  # Connection(url) refuses these; Connection(**parts) would swallow them
        raise BrokerUrlError(f"kombu knows no URL option {unknown[0]} (in its query string)")
    # A Connection from the URL's parts, not from the URL, never loads the transport; kombu
    # still applies its own rules to them (rediss:// without ssl options, for one).
    connection = Connection(
        transport=scheme, transport_options=dict(options), alternates=alternates, **parts
    )
    return settings_for(connection)


def _settings(
    scheme: str,
    hostname: str | None,
    port: int | None,
    userid: str | None,
    password: str | None,
    virtual_host: str | None,
    ssl: object,
    alternates: Iterable[str],
    options: Mapping[str, Any] | None,
) -> RedisSettings:
    options = dict(options or {})
    hostname = hostname or "127.0.0.1"
    tls: Mapping[str, Any] | None = None
    if ssl:
        tls = ssl if isinstance(ssl, Mapping) else {}
    elif scheme == "rediss":
        tls = {}
    if "://" in hostname:  # redis+socket:///path?virtual_host=N puts the socket URL here
        parts = urlsplit(hostname)
        query = dict(parse_qsl(parts.query))
        username, secret = parts.username, parts.password
        return RedisSettings(
            path=unquote(parts.path),
            db=_db(query.get("virtual_host", virtual_host)),
            username=unquote(username) if username else userid,
            password=unquote(secret) if secret else password,
            options=options,
            fallbacks=_fallbacks(alternates, options),
        )
    sentinels: tuple[tuple[str, int], ...] = ()
    fallbacks: tuple[RedisSettings, ...] = ()
    if scheme == "sentinel":  # the alternates are more sentinels to ask, not more servers
        found = []
        for alt in alternates:
            url = urlsplit(alt)
            if url.scheme == "sentinel" and url.hostname:
                found.append((url.hostname, url.port or 26379))
        sentinels = tuple(found) or ((hostname, port or 26379),)
    else:
        fallbacks = _fallbacks(alternates, options)
    return RedisSettings(
        host=hostname,
        port=port or _DEFAULT_PORT,
        db=_db(virtual_host),
        username=userid,
        password=password,
        tls=tls,
        sentinels=sentinels,
        options=options,
        fallbacks=fallbacks,
    )


def _fallbacks(alternates: Iterable[str], options: Mapping[str, Any]) -> tuple[RedisSettings, ...]:
    """Each URL after the first of a failover list, read on its own (its own database, its
    own credentials); one that is not a Redis URL is left out."""
    found = (_settings_for_url(alt, options) for alt in list(alternates)[1:] if alt.strip())
    return tuple(settings for settings in found if settings is not None)


def _tls_context(options: Mapping[str, Any]) -> ssl.SSLContext:
    """An SSL context from kombu's / Celery's `broker_use_ssl` keys for Redis."""
    context = ssl.create_default_context(cafile=options.get("ssl_ca_certs") or None)
    required = options.get("ssl_cert_reqs", ssl.CERT_REQUIRED)
    if isinstance(required, str):
        required = {
            "none": ssl.CERT_NONE,
            "cert_none": ssl.CERT_NONE,
            "optional": ssl.CERT_OPTIONAL,
            "cert_optional": ssl.CERT_OPTIONAL,
        }.get(required.lower(), ssl.CERT_REQUIRED)
    if required == ssl.CERT_NONE or not _flag(options.get("ssl_check_hostname", True)):
        context.check_hostname = False
    context.verify_mode = required
    if options.get("ssl_certfile"):
        context.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile") or None)
    return context


def _flag(value: object) -> bool:
    """A boolean option that may come from a URL's query string as text."""
    if isinstance(value, str):
        return value.strip().lower() not in ("false", "0", "no", "off", "")
    return bool(value)


def command(*parts: str | bytes) -> bytes:
    """One command in Redis' wire protocol (RESP), to send alone or pipelined."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _master(settings: RedisSettings, timeout: float) -> tuple[str, int]:
    from redis.sentinel import Sentinel

    options = settings.options
    master_name = options.get("master_name")
    if not master_name:
        raise ValueError("a sentinel:// broker URL needs the master_name transport option")
    sentinel = Sentinel(
        list(settings.sentinels),
        sentinel_kwargs=options.get("sentinel_kwargs"),
        socket_timeout=timeout,
    )
    try:
        host, port = sentinel.discover_master(master_name)
    finally:
        for client in sentinel.sentinels:
            client.close()
    return str(host), int(port)


def connect(
    settings: RedisSettings,
    timeout: float = 10.0,
    connect_timeout: float = 5.0,
    select: bool = False,
) -> Any:
    """A socket to the Redis server, authenticated (TLS when configured), in the URL's
    database when `select` (keys live there; pub/sub ignores it). A failover list's servers
    are tried in turn; the last one's error is raised."""
    return connect_any(settings, timeout, connect_timeout, select)[0]


def connect_any(
    settings: RedisSettings,
    timeout: float = 10.0,
    connect_timeout: float = 5.0,
    select: bool = False,
) -> tuple[Any, RedisSettings]:
    """`connect`, and the settings of the server it reached: a failover URL has its own
    database, and pub/sub channels are named after it (`/{db}.celeryev`)."""
    candidates = (settings, *settings.fallbacks)
    for i, candidate in enumerate(candidates):
        try:
            return _connect(candidate, timeout, connect_timeout, select), candidate
        except Exception:
            if i == len(candidates) - 1:
                raise
            log.debug("Redis %d of %d unreachable, trying the next", i + 1, len(candidates))
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


def _connect(settings: RedisSettings, timeout: float, connect_timeout: float, select: bool) -> Any:
    if settings.path:
        sock: Any = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(connect_timeout)
        try:
            sock.connect(settings.path)
        except BaseException:
            sock.close()
            raise
    else:
        host, port = (
            _master(settings, timeout) if settings.sentinels else (settings.host, settings.port)
        )
        sock = socket.create_connection((host, port), timeout=connect_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if settings.tls is not None:
            try:
                sock = _tls_context(settings.tls).wrap_socket(sock, server_hostname=host)
            except BaseException:
                sock.close()
                raise
    sock.settimeout(timeout)
    try:
        credentials = _credentials(settings)
        if credentials:
            _expect_ok(sock, command("AUTH", *credentials), "AUTH")
        _expect_ok(sock, command("CLIENT", "SETNAME", "celery-obs-exporter"), None)
        if select and settings.db:
            _expect_ok(sock, command("SELECT", str(settings.db)), f"SELECT {settings.db}")
    except BaseException:
        sock.close()
        raise
    return sock


def _credentials(settings: RedisSettings) -> tuple[str, ...]:
    """AUTH's arguments as redis-py sends them: a user name goes with its password, even an
    empty one (a `nopass` user); a password alone authenticates the default user."""
    if settings.username:
        return (settings.username, settings.password or "")
    return (settings.password,) if settings.password else ()


def subscribe(sock: Any, topics: Iterable[str]) -> None:
    """Send PSUBSCRIBE; Redis' confirmations (or refusal) are read by the event stream."""
    sock.sendall(command("PSUBSCRIBE", *topics))


def request(sock: Any, commands: list[bytes]) -> list[Any]:
    """Send the commands pipelined; their replies in order (an error reply as a ReplyError
    instance, not raised: one failed command must not hide the others' replies)."""
    sock.sendall(b"".join(commands))
    replies = _Replies(sock)
    return [replies.read() for _ in commands]


class _Replies:
    """Reads RESP2 replies off a socket. Only for the short answers to our own commands (the
    event stream's volume goes through hiredis), so plain Python and no dependency."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._buffer = bytearray()

    def read(self) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b":":
            return int(rest)
        if kind == b"+":
            return bytes(rest)
        if kind == b"-":
            return ReplyError(rest.decode("utf-8", "replace"))
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else self._exactly(size)
        if kind == b"*":
            size = int(rest)
            return None if size < 0 else [self.read() for _ in range(size)]
        raise ConnectionError(f"not a Redis reply: {bytes(line[:40])!r}")

    def _line(self) -> bytes:
        while (end := self._buffer.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 2]
        return line

    def _exactly(self, size: int) -> bytes:
        while len(self._buffer) < size + 2:
            self._fill()
        data = bytes(self._buffer[:size])
        del self._buffer[: size + 2]
        return data

    def _fill(self) -> None:
        chunk = self._sock.recv(65536)
        if not chunk:
            raise ConnectionError("Redis closed the connection")
        self._buffer += chunk


def _expect_ok(sock: Any, command: bytes, name: str | None) -> None:
    """Send one command; an error reply raises RedisRefused unless `name` is None (a command
    whose refusal does not matter, like CLIENT SETNAME under a strict ACL)."""
    (reply,) = request(sock, [command])
    if isinstance(reply, ReplyError) and name is not None:
        raise RedisRefused(f"Redis refused {name}: {reply}")
