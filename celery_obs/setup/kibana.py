"""Import kibana/celery.ndjson (data view, saved searches, Lens charts, dashboard) into Kibana.

Uses the saved objects import API (`POST /api/saved_objects/_import?overwrite=true`, a
multipart upload with the `kbn-xsrf` header Kibana requires on writes). Our objects have fixed
ids, so a second import overwrites them in place instead of adding copies. Plain urllib: the
API is one request and Kibana has no official Python client.
"""

from __future__ import annotations

import base64
import json
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..retry import Deadline
from .errors import SetupError

# Kibana answers 503 while it starts or while Elasticsearch is unavailable.
_TRANSIENT = {429, 502, 503, 504}


@dataclass(frozen=True)
class KibanaConnection:
    url: str
    api_key: str | None = None
    username: str | None = None
    password: str | None = None
    ca_certs: str | None = None
    insecure: bool = False
    space: str | None = None
    timeout: float = 30.0

    @property
    def base(self) -> str:
        """Kibana's URL for the space: /s/<space> prefixes every API path but the default's."""
        root = self.url.rstrip("/")
        return f"{root}/s/{urllib.parse.quote(self.space)}" if self.space else root

    def headers(self) -> dict[str, str]:
        headers = {"kbn-xsrf": "celery-obs", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"ApiKey {self.api_key}"
        elif self.username:
            token = base64.b64encode(f"{self.username}:{self.password or ''}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        return headers

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.url.startswith("https:"):
            return None
        context = ssl.create_default_context(cafile=self.ca_certs)
        if self.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


@dataclass
class ImportReport:
    success: bool
    imported: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return sum(self.imported.values())


def multipart(filename: str, content: bytes) -> tuple[str, bytes]:
    """A multipart/form-data body with the file in the `file` field, as the import API takes."""
    boundary = f"celery-obs-{uuid.uuid4().hex}"
    body = (
        (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            "Content-Type: application/ndjson\r\n\r\n"
        ).encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return f"multipart/form-data; boundary={boundary}", body


def _error_text(error: dict[str, Any]) -> str:
    meta = error.get("meta") or {}
    title = meta.get("title") or error.get("title") or ""
    detail = error.get("error") or {}
    kind = detail.get("type", "error")
    if kind == "missing_references":
        missing = ", ".join(f"{r.get('type')} {r.get('id')}" for r in detail.get("references", []))
        kind = f"missing references: {missing}"
    elif detail.get("message"):
        kind = f"{kind}: {detail['message']}"
    named = f" ({title})" if title else ""
    return f"{error.get('type')} {error.get('id')}{named}: {kind}"


class KibanaClient:
    def __init__(
        self,
        connection: KibanaConnection,
        wait: float = 0.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.connection = connection
        self.wait = wait
        self.sleep = sleep
        self.clock = clock
        self.deadline = Deadline(wait, clock)

    def request(
        self, method: str, path: str, body: bytes | None = None, content_type: str | None = None
    ) -> Any:
        """One request; refused connections and 5xx-while-starting are retried until --wait."""
        connection = self.connection
        headers = connection.headers()
        if content_type:
            headers["Content-Type"] = content_type
        url = connection.base + path
        if not url.startswith(("http://", "https://")):  # never file: or another scheme
            raise SetupError(f"Kibana URL must be http:// or https://, got {connection.url!r}")
        while True:
            # http(s) only, checked above.
            request = urllib.request.Request(url, data=body, headers=headers, method=method)  # noqa: S310
            try:
                with urllib.request.urlopen(  # noqa: S310 - http(s) only, checked above
                    request, timeout=connection.timeout, context=connection.ssl_context()
                ) as response:
                    return json.loads(response.read() or b"null")
            except urllib.error.HTTPError as exc:
                text = exc.read().decode(errors="replace")[:500]
                if exc.code == 401:
                    raise SetupError(
                        f"Kibana at {connection.url} refused the credentials (401): give "
                        "--api-key or --user/--password (env KIBANA_USERNAME/KIBANA_PASSWORD, "
                        "falling back to ELASTICSEARCH_USERNAME/ELASTICSEARCH_PASSWORD)"
                    ) from None
                if exc.code == 403:
                    raise SetupError(
                        f"{method} {path} was forbidden by Kibana: the user needs the "
                        f"Saved Objects Management privilege (all) in the space: {text}"
                    ) from None
                if exc.code == 404 and connection.space:
                    raise SetupError(
                        f"Kibana answered 404 for {url}: does the space "
                        f"{connection.space!r} exist? {text}"
                    ) from None
                if exc.code not in _TRANSIENT or self.deadline.passed():
                    raise SetupError(
                        f"Kibana answered {method} {path} with {exc.code}: {text}"
                    ) from None
            except ssl.SSLError as exc:
                raise SetupError(
                    f"TLS with {connection.url} failed: {exc}. For a private CA give "
                    "--ca-certs FILE (env KIBANA_CA_CERTS); --insecure skips verification"
                ) from None
            except (urllib.error.URLError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                if isinstance(reason, ssl.SSLError):
                    raise SetupError(
                        f"TLS with {connection.url} failed: {reason}. For a private CA give "
                        "--ca-certs FILE (env KIBANA_CA_CERTS); --insecure skips verification"
                    ) from None
                if self.deadline.passed():
                    waited = f" after waiting {self.wait:g}s" if self.wait > 0 else ""
                    raise SetupError(
                        f"cannot reach Kibana at {connection.url}{waited}: {reason}"
                    ) from None
            except json.JSONDecodeError:
                raise SetupError(
                    f"Kibana at {connection.url} answered {method} {path} with something that "
                    "is not JSON: is the URL Kibana's?"
                ) from None
            self.sleep(self.deadline.pause(1.0))

    def wait_until_available(self) -> None:
        """Kibana's status API answers 200 once it can serve requests (503 before)."""
        self.request("GET", "/api/status")

    def import_objects(self, path: Path) -> ImportReport:
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise SetupError(f"cannot read {path}: {exc.strerror or exc}") from None
        content_type, body = multipart(path.name, content)
        answer = self.request(
            "POST", "/api/saved_objects/_import?overwrite=true", body, content_type
        )
        if not isinstance(answer, dict):
            raise SetupError(f"unexpected answer from the import API: {answer!r}")
        report = ImportReport(success=bool(answer.get("success")))
        for result in answer.get("successResults") or []:
            report.imported[str(result.get("type"))] += 1
        if not report.imported and answer.get("successCount"):
            report.imported["object"] = int(answer["successCount"])
        report.errors = [_error_text(error) for error in answer.get("errors") or []]
        return report


def import_objects(connection: KibanaConnection, path: Path, wait: float = 0.0) -> ImportReport:
    client = KibanaClient(connection, wait)
    if wait > 0:
        client.wait_until_available()
    return client.import_objects(path)
