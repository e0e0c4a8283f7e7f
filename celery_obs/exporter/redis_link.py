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

import socket
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from kombu import Connection

EVENT_EXCHANGE = "celeryev"
_DEFAULT_PORT = 6379


class RedisRefused(ConnectionError):
    """Redis answered a command of ours with an error (a wrong password, an ACL)."""


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

    @property
    def topics(self) -> list[str]:
        """The channel patterns kombu publishes Celery's events to, for any kombu version."""
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
        routing = "/*" if options.get("fanout_patterns", True) else ""
        keyprefix = str(options.get("global_keyprefix", "") or "")
        return [f"{keyprefix}{p}{EVENT_EXCHANGE}{routing}" for p in dict.fromkeys(prefixes)]


def _db(virtual_host: object) -> int:
    text = str(virtual_host or "").strip("/")
    return int(text) if text.isdigit() else 0


def settings_for(connection: Connection) -> RedisSettings | None:
    """What to connect to, from kombu's public connection attributes; None if not Redis."""
    if connection.transport.driver_type != "redis":
        return None
    options = dict(connection.transport_options or {})
    scheme = connection.transport_cls if isinstance(connection.transport_cls, str) else ""
    hostname = connection.hostname or "127.0.0.1"
    tls: Mapping[str, Any] | None = None
    if connection.ssl:
        tls = connection.ssl if isinstance(connection.ssl, Mapping) else {}
    elif scheme == "rediss":
        tls = {}
    if "://" in hostname:  # redis+socket:///path?virtual_host=N puts the socket URL here
        parts = urlsplit(hostname)
        query = dict(parse_qsl(parts.query))
        return RedisSettings(
            path=unquote(parts.path),
            db=_db(query.get("virtual_host", connection.virtual_host)),
            username=parts.username or connection.userid,
            password=parts.password or connection.password,
            options=options,
        )
    sentinels: tuple[tuple[str, int], ...] = ()
    if scheme == "sentinel":
        found = []
        for alt in connection.alt or [connection.as_uri(include_password=True)]:
            url = urlsplit(alt)
            if url.scheme == "sentinel" and url.hostname:
                found.append((url.hostname, url.port or 26379))
        sentinels = tuple(found) or ((hostname, connection.port or 26379),)
    return RedisSettings(
        host=hostname,
        port=connection.port or _DEFAULT_PORT,
        db=_db(connection.virtual_host),
        username=connection.userid,
        password=connection.password,
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
    if required == ssl.CERT_NONE:
        context.check_hostname = False
    context.verify_mode = required
    if options.get("ssl_certfile"):
        context.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile") or None)
    return context


def _command(*parts: str | bytes) -> bytes:
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


def connect(settings: RedisSettings, timeout: float = 10.0, connect_timeout: float = 5.0) -> Any:
    """A socket to the Redis server, authenticated (TLS when configured)."""
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
        if settings.password or settings.username:
            credentials = [c for c in (settings.username, settings.password) if c]
            _expect_ok(sock, _command("AUTH", *credentials))
        _expect_ok(sock, _command("CLIENT", "SETNAME", "celery-obs-exporter"), lenient=True)
    except BaseException:
        sock.close()
        raise
    return sock


def subscribe(sock: Any, topics: Iterable[str]) -> None:
    """Send PSUBSCRIBE; Redis' confirmations (or refusal) are read by the event stream."""
    sock.sendall(_command("PSUBSCRIBE", *topics))


def _expect_ok(sock: Any, command: bytes, lenient: bool = False) -> None:
    import hiredis

    sock.sendall(command)
    reader = hiredis.Reader()
    while (reply := reader.gets()) is False:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("Redis closed the connection")
        reader.feed(chunk)
    if isinstance(reply, Exception) and not lenient:
        raise RedisRefused(f"Redis refused: {reply}")
