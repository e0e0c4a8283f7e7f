"""`python -m celery_obs.healthcheck`: the image's HEALTHCHECK, for every role it runs.

The image runs the exporter, Celery workers and one-shot setup jobs; only the exporter serves
a health endpoint. So: when the container's command is `celery-obs exporter`, ask its `/livez`
(alive, even through a broker outage: restarting it would not bring the broker back) at the
address it listens on; any other command is healthy while it runs. The probe paths answer
without credentials even when the endpoint has basic auth, so the check needs none.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence

import yaml

DEFAULT_LISTEN = ":9808"
LISTEN_FLAG = "--web.listen-address"


def _flag(argv: Sequence[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def livez_url(argv: Sequence[str], environ: Mapping[str, str]) -> str | None:
    """The exporter's /livez URL if `argv` runs the exporter, else None."""
    if "exporter" not in argv:
        return None
    listen = (
        _flag(argv, LISTEN_FLAG) or environ.get("CELERY_OBS_WEB_LISTEN_ADDRESS") or DEFAULT_LISTEN
    )
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):  # noqa: S104 - listening on all: ask it on loopback
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    # As the exporter reads it: the flag wins even when empty, and empty means none.
    web_config = _flag(argv, "--web.config.file")
    if web_config is None:
        web_config = environ.get("CELERY_OBS_WEB_CONFIG_FILE")
    tls = bool(web_config) and _serves_tls(str(web_config))
    return f"{'https' if tls else 'http'}://{host}:{port}/livez"


def _serves_tls(web_config: str) -> bool:
    # A web config may hold only basic auth users: then the endpoint speaks plain HTTP. (Trying
    # HTTPS first would not tell quickly: a plain server waits for a request head that a TLS
    # hello never completes.) A file this check cannot read is one the exporter reads as HTTPS.
    try:
        with open(web_config, encoding="utf-8") as f:
            config = yaml.safe_load(f)
    except (OSError, ValueError, yaml.YAMLError):
        return True
    if config is None:  # empty, or comments only: a valid config without TLS
        return False
    return not isinstance(config, dict) or bool(config.get("tls_server_config"))


def alive(url: str, timeout: float = 4.0) -> tuple[bool, str]:
    # The check runs inside the container against its own endpoint: a self-signed certificate
    # is expected, and nothing crosses a network.
    context = None
    if url.startswith("https:"):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        # The URL is livez_url's: http(s) to the exporter, no other scheme.
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:  # noqa: S310
            return True, response.read().decode(errors="replace").strip()
    except urllib.error.HTTPError as exc:
        return False, f"{exc.code} {exc.reason}"
    except OSError as exc:
        return False, str(exc)


def main(cmdline: str = "/proc/1/cmdline") -> int:
    try:
        with open(cmdline, "rb") as f:
            argv = [arg.decode(errors="replace") for arg in f.read().split(b"\0") if arg]
    except OSError:
        argv = sys.argv[1:]  # no /proc: check what we were told
    url = livez_url(argv, os.environ)
    if url is None:
        return 0
    ok, said = alive(url)
    print(f"{url}: {said}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
