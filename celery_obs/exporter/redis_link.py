"""The exporter's own links to Redis (the event subscription, queue-length probes, broadcasts
to the workers), from the broker URL and transport options alone: no kombu channel internals,
so every kombu and redis-py version we admit runs the same paths, and redis-py stays unloaded.

The wire format is Celery's and Redis', not kombu's internals: kombu publishes a fanout message
to the pub/sub channel `<global_keyprefix><fanout prefix>celeryev/<routing key>`, where the
fanout prefix is `/<db>.` by default (`fanout_prefix`; a string of its own, or none), and the
routing key is dropped when `fanout_patterns` is off. So the exporter connects (TCP, TLS or a
unix socket; a sentinel is asked for the master with redis-py's public Sentinel), authenticates,
and PSUBSCRIBEs to that pattern. No key is written to the user's Redis (broadcasts are
PUBLISHed, as Celery's own are).

kombu before 5.4 never put the database number into a sentinel's fanout prefix: on a sentinel
URL the literal `/{db}.` channel is subscribed to as well, so older workers are heard too.
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from kombu import Connection
from kombu.utils.url import parse_url

from .transports import CONTROL_EXCHANGE, EVENT_EXCHANGE, driver_of, driver_of_alias

log = logging.getLogger(__name__)

_DEFAULT_PORT = 6379


class RedisRefused(ConnectionError):
    """Redis answered a command of ours with an error (a wrong password, an ACL)."""


class ReplyError(Exception):
    """An error reply (`-ERR ...`), returned in place of the command's reply, not raised."""


class BrokerUrlError(ValueError):
    """A Redis broker URL kombu would not accept either. The message never quotes the URL,
    which can hold a password: the caller shows the masked URL beside it."""


class Failover:
    """The position in a failover list: the server last reached (index 0 is the first URL)."""

    def __init__(self) -> None:
        self.current = 0


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
    #: Which of them the exporter's links reached last, shared by all of them (the settings
    #: object is), so the event stream, the probe and the broadcasts stay on one server, as
    #: kombu's one connection would. Not part of what the settings are.
    failover: Failover = field(default_factory=Failover, compare=False, repr=False)

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
    """The database number, read as kombu's Redis transport reads it (`/2`, `2`, `/2 `)."""
    if isinstance(virtual_host, int):
        return virtual_host
    text = str(virtual_host or "")
    if text in ("", "/"):
        return 0
    try:
        return int(text.removeprefix("/"))
    except ValueError:  # kombu's transport refuses it too, when it connects
        raise BrokerUrlError("the database (the URL's path) must be a number") from None


def settings_for(connection: Connection) -> RedisSettings | None:
    """The server a connection is on now, from kombu's public connection attributes (a
    failover list's other servers are not included); None if not Redis."""
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
    """The first server as `settings_for(Connection(url, transport_options=options))` reads
    it, with a failover list's others as kombu fails over to them; None if not Redis.

    kombu's Connection imports the transport's module to parse a URL, and its Redis module
    imports redis-py (~10 MB resident, which the exporter does not use on Redis). This splits
    the URL as the Connection does (`;` between failover URLs, `redis+socket://`, kombu's own
    `parse_url`); tests hold the result to kombu's for every URL form. A Redis URL kombu
    cannot read (or misreads) raises BrokerUrlError, whose message is safe to show.
    """
    if "#" in url and driver_of_alias(url.partition("://")[0].lower()) == "redis":
        # kombu reads `redis://:pa#ss@host` as a fragment and connects to localhost, without a
        # password: that is never what was meant.
        raise BrokerUrlError("it has a '#' (a URL fragment): write one in a password as %23")
    try:
        return _settings_for_url(url, options)
    except BrokerUrlError:
        raise
    except Exception as exc:  # kombu's own parsing: its message may quote a password
        raise BrokerUrlError(_why_unreadable(url, exc)) from None


#: What a URL's query string may set besides the URL's own parts, as kombu's Connection reads
#: it (its connection parameters, the only keys its `Connection(url)` accepts).
_URL_OPTIONS = frozenset(
    {
        *("hostname", "port", "userid", "password", "virtual_host", "transport", "ssl"),
        *("insist", "connect_timeout", "login_method", "heartbeat", "credential_provider"),
    }
)


def _why_unreadable(url: str, exc: Exception) -> str:
    """Why kombu refused the URL, in words that never quote any of it but a keyword name."""
    repeated = re.search(r"multiple values for keyword argument '(\w+)'", str(exc))
    if repeated:  # `redis://h/0?virtual_host=1`: the path already is the virtual host
        return (
            f"its query string sets {repeated.group(1)}, which kombu takes only from the URL itself"
        )
    hint = (
        " (a ';' separates failover URLs: write one in a password as %3B)"
        if ";" in url
        else " (a '/', '?', '@' or ':' in a password must be written %2F, %3F, %40, %3A)"
    )
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
        local = _settings(alias, hostname, None, None, None, None, None, alternates, options)
        # kombu reads this form without loading the transport, and fails over from it alike.
        connection = Connection(first, transport_options=dict(options), alternates=alternates)
        return replace(local, fallbacks=_switched(connection, alternates[1:]))
    parts = parse_url(first)  # as kombu reads it: the scheme lower-cased, spaces stripped
    scheme = parts.pop("transport")
    if driver_of_alias(scheme) != "redis":
        return None
    _check_options(parts)
    # A Connection from the URL's parts, not from the URL, never loads the transport; kombu
    # still applies its own rules to them (rediss:// without ssl options, for one).
    connection = Connection(
        transport=scheme, transport_options=dict(options), alternates=alternates, **parts
    )
    primary = settings_for(connection)
    if primary is None or primary.sentinels:
        return primary
    return replace(primary, fallbacks=_switched(connection, alternates[1:]))


def _check_options(parts: Mapping[str, Any]) -> None:
    """Refuse what kombu's Connection(url) refuses, and what the exporter cannot do."""
    if set(parts) - _URL_OPTIONS:  # Connection(url) refuses these; Connection(**parts) not
        # The option's name is not quoted: with a '?' in a password it is part of the password.
        raise BrokerUrlError(
            "its query string has an option kombu does not know (a '?' in a password must be"
            " written %3F)"
        )
    if parts.get("credential_provider"):
        raise BrokerUrlError(
            "credential_provider is not supported by the exporter: put the credentials in the URL"
        )


def _switched(connection: Connection, alternates: list[str]) -> tuple[RedisSettings, ...]:
    """The servers kombu fails over to, in its order: `switch()` is its own failover step, so
    what a URL leaves out comes as kombu takes it (port and database from the server before;
    the scheme, TLS options and, for a bare host name, credentials from the first URL). It
    does no I/O."""
    found = []
    for alternate in alternates:
        if not alternate.strip():  # `redis://a;`: kombu would try a host named ""
            continue
        if "://" in alternate:
            scheme = alternate.partition("://")[0]
            if "+" in scheme:  # `redis+socket://` after the first: kombu cannot switch to it
                continue
            _check_options(parse_url(alternate))
        connection.switch(alternate)
        settings = settings_for(connection)
        if settings is not None:
            found.append(settings)
    return tuple(found)


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
        )
    sentinels: tuple[tuple[str, int], ...] = ()
    if scheme == "sentinel":  # the alternates are more sentinels to ask, not more servers
        found = []
        for alt in alternates:
            url = urlsplit(alt)
            if url.scheme == "sentinel" and url.hostname:
                found.append((url.hostname, url.port or 26379))
        sentinels = tuple(found) or ((hostname, port or 26379),)
    return RedisSettings(
        host=hostname,
        port=port or _DEFAULT_PORT,
        db=_db(virtual_host),
        username=userid,
        password=password,
        tls=tls,
        sentinels=sentinels,
        options=options,
    )


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
    lead: bool = False,
) -> tuple[Any, RedisSettings]:
    """`connect`, and the settings of the server it reached: a failover URL has its own
    database, and pub/sub channels are named after it (`/{db}.celeryev`).

    Every link starts from the server the leading link (the event stream, which follows the
    workers' events) reached last; only the leader moves that position, so a probe or a
    broadcast that once reaches another server does not pull the others after it."""
    candidates = (settings, *settings.fallbacks)
    if len(candidates) == 1:
        return _connect(settings, timeout, connect_timeout, select), settings
    # From the server reached last, round the list, as kombu's round-robin failover goes.
    start = settings.failover.current % len(candidates)
    errors = []
    for step in range(len(candidates)):
        index = (start + step) % len(candidates)
        candidate = candidates[index]
        try:
            sock = _connect(candidate, timeout, connect_timeout, select)
        except Exception as exc:
            errors.append(f"{_where(candidate)}: {type(exc).__name__}: {exc}")
            continue
        if lead and index != settings.failover.current:
            log.info("Redis failover: now on %s", _where(candidate))
            settings.failover.current = index
        return sock, candidate
    raise ConnectionError(f"no server of the failover list answered ({'; '.join(errors)})")


def _where(settings: RedisSettings) -> str:
    """A server's address for messages (never its credentials)."""
    return settings.path or f"{settings.host}:{settings.port}"


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


#: Nested arrays deeper than this are not a reply to any command of ours.
_MAX_NESTING = 8


class _Replies:
    """Reads RESP2 replies off a socket. Only for the short answers to our own commands (the
    event stream's volume goes through hiredis), so plain Python and no dependency."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._buffer = bytearray()

    def read(self, depth: int = 0) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return bytes(rest)
        if kind == b"-":
            # "ERR unknown command 'AUTH', with args beginning with: 'user' 'password'": Redis
            # quotes a refused command's arguments, which for AUTH are the credentials.
            text = rest.decode("utf-8", "replace").partition(", with args beginning with")[0]
            return ReplyError(text)
        if kind == b":":
            return self._number(line)
        if kind == b"$":
            size = self._number(line)
            return None if size < 0 else self._exactly(size)
        if kind == b"*" and depth < _MAX_NESTING:
            size = self._number(line)
            return None if size < 0 else [self.read(depth + 1) for _ in range(size)]
        raise ConnectionError(f"not a Redis reply: {line[:40]!r}")

    @staticmethod
    def _number(line: bytes) -> int:
        try:
            return int(line[1:])
        except ValueError:
            raise ConnectionError(f"not a Redis reply: {line[:40]!r}") from None

    def _line(self) -> bytes:
        while (end := self._buffer.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 2]
        return line

    def _exactly(self, size: int) -> bytes:
        while len(self._buffer) < size + 2:
            self._fill()
        if self._buffer[size : size + 2] != b"\r\n":
            raise ConnectionError("not a Redis reply: a bulk string without its CRLF")
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
