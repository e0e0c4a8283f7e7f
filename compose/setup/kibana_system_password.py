"""Set the `kibana_system` user's password, so Kibana can log in to Elasticsearch.

Kibana 8 refuses to connect as the `elastic` superuser, and the built-in `kibana_system` user
has no password until someone sets one. The compose `setup-elasticsearch` service runs this
before Kibana starts. Setting the same password again is harmless, so reruns are fine.

Environment: ELASTICSEARCH_URL, ELASTICSEARCH_USERNAME (default elastic), ELASTICSEARCH_PASSWORD,
KIBANA_SYSTEM_PASSWORD; SETUP_WAIT_SECONDS (default 300) bounds the wait for Elasticsearch.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping


def set_password(environ: Mapping[str, str], sleep: Callable[[float], None] = time.sleep) -> str:
    """Returns a line to print; raises SystemExit with the reason when it cannot succeed."""
    url = environ.get("ELASTICSEARCH_URL", "http://elasticsearch:9200").rstrip("/")
    user = environ.get("ELASTICSEARCH_USERNAME", "elastic")
    password = environ.get("ELASTICSEARCH_PASSWORD", "")
    new_password = environ.get("KIBANA_SYSTEM_PASSWORD", "")
    if not password or not new_password:
        raise SystemExit("ELASTICSEARCH_PASSWORD and KIBANA_SYSTEM_PASSWORD must be set")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(
        f"{url}/_security/user/kibana_system/_password",
        data=json.dumps({"password": new_password}).encode(),
        headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"},
        method="POST",
    )
    deadline = time.monotonic() + float(environ.get("SETUP_WAIT_SECONDS", "300"))
    while True:
        try:
            with urllib.request.urlopen(request, timeout=10):
                return f"kibana_system password set on {url}"
        except urllib.error.HTTPError as exc:
            # 401/403/400 will not change by waiting; 5xx (security index not ready) may.
            if exc.code < 500:
                detail = exc.read().decode(errors="replace")[:500]
                raise SystemExit(f"{url} refused as {user}: HTTP {exc.code}: {detail}") from None
            reason = f"HTTP {exc.code}"
        except OSError as exc:
            reason = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up setting the kibana_system password on {url}: {reason}")
        print(f"waiting for {url}: {reason}", file=sys.stderr, flush=True)
        sleep(2.0)


if __name__ == "__main__":
    print(set_password(os.environ), flush=True)
