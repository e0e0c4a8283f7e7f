"""Load a Prometheus exporter-toolkit `web-config.yml`: TLS and bcrypt basic-auth users.

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

Anything malformed is a `WebConfigError` naming the file and the key, raised at startup.
"""

from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass, field
from typing import Any

import yaml

log = logging.getLogger(__name__)

_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
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
_BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")


class WebConfigError(ValueError):
    """The web config file cannot be used; the message says which file and which key."""


@dataclass(frozen=True)
class WebConfig:
    ssl_context: ssl.SSLContext | None = None
    basic_auth_users: dict[str, bytes] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


def _mapping(value: Any, where: str, path: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise WebConfigError(f"{path}: {where} must be a mapping, got {type(value).__name__}")
    return value


def _check_keys(found: dict[str, Any], allowed: set[str], where: str, path: str) -> None:
    unknown = sorted(set(found) - allowed)
    if unknown:
        raise WebConfigError(f"{path}: unknown key(s) in {where}: {', '.join(unknown)}")


def _ssl_context(tls: dict[str, Any], base: str, path: str) -> ssl.SSLContext:
    _check_keys(tls, _TLS_KEYS, "tls_server_config", path)
    cert, key = tls.get("cert_file"), tls.get("key_file")
    if not cert or not key:
        raise WebConfigError(f"{path}: tls_server_config needs both cert_file and key_file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert, key = os.path.join(base, cert), os.path.join(base, key)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise WebConfigError(
            f"{path}: cannot load cert_file {cert} / key_file {key}: {exc}"
        ) from None
    for name, key_name in (("min_version", "minimum_version"), ("max_version", "maximum_version")):
        if name in tls:
            if tls[name] not in _TLS_VERSIONS:
                raise WebConfigError(f"{path}: {name} must be one of {', '.join(_TLS_VERSIONS)}")
            setattr(context, key_name, _TLS_VERSIONS[tls[name]])
    auth_type = tls.get("client_auth_type", "NoClientCert")
    if auth_type not in _CLIENT_AUTH:
        raise WebConfigError(f"{path}: client_auth_type must be one of {', '.join(_CLIENT_AUTH)}")
    context.verify_mode = _CLIENT_AUTH[auth_type]
    if tls.get("client_ca_file"):
        ca = os.path.join(base, tls["client_ca_file"])
        try:
            context.load_verify_locations(ca)
        except (OSError, ssl.SSLError) as exc:
            raise WebConfigError(f"{path}: cannot load client_ca_file {ca}: {exc}") from None
    elif auth_type != "NoClientCert":
        # Go's RequestClientCert/RequireAnyClientCert accept any certificate unverified;
        # Python's TLS always verifies one it asks for, so every mode needs the CA to do so.
        raise WebConfigError(
            f"{path}: client_auth_type {auth_type} needs client_ca_file "
            "(client certificates are always verified here)"
        )
    for ignored in sorted(_IGNORED_TLS_KEYS & set(tls)):
        log.warning("%s: tls_server_config.%s is not supported and is ignored", path, ignored)
    return context


def _users(users: dict[str, Any], path: str) -> dict[str, bytes]:
    hashes = {}
    for user, hashed in users.items():
        if not isinstance(hashed, str) or not hashed.startswith(_BCRYPT_PREFIXES):
            raise WebConfigError(f"{path}: basic_auth_users.{user} must be a bcrypt hash ($2y$...)")
        hashes[str(user)] = hashed.encode()
    return hashes


def load_web_config(path: str) -> WebConfig:
    try:
        with open(path, encoding="utf-8") as handle:
            raw = yaml.safe_load(handle)
    except OSError as exc:
        raise WebConfigError(f"{path}: cannot read web config: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise WebConfigError(f"{path}: not valid YAML: {exc}") from None
    config = _mapping(raw, "the web config", path)
    _check_keys(config, _TOP_KEYS, "the web config", path)
    base = os.path.dirname(os.path.abspath(path))
    tls = _mapping(config.get("tls_server_config"), "tls_server_config", path)
    http = _mapping(config.get("http_server_config"), "http_server_config", path)
    _check_keys(http, {"headers", "http2"}, "http_server_config", path)
    headers = _mapping(http.get("headers"), "http_server_config.headers", path)
    return WebConfig(
        ssl_context=_ssl_context(tls, base, path) if tls else None,
        basic_auth_users=_users(
            _mapping(config.get("basic_auth_users"), "basic_auth_users", path), path
        ),
        headers={str(k): str(v) for k, v in headers.items()},
    )
