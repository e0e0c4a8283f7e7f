"""Install the ILM policy, component template and index template for logs-celery-*.

Every object is written with PUT, which creates or replaces it, so running the setup twice is
harmless; a GET first tells which of the two happened. Requests go through the official client
(auth, TLS, the X-Elastic-Product check) but pin REST API compatibility to 8: Elasticsearch 8
refuses the `compatible-with=9` a 9.x client sends by default, and Elasticsearch 9 still
answers 8-compatible requests, so one setup works against both whatever client is installed.
"""

from __future__ import annotations

import time
import urllib.parse
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import elasticsearch
from elastic_transport import ConnectionError as TransportConnectionError
from elastic_transport import TlsError, TransportError

from ..retry import Deadline
from .assets import COMPONENT_TEMPLATE, ILM_POLICY, INDEX_PATTERN, INDEX_TEMPLATE, Assets
from .errors import SetupError

_COMPAT = "application/vnd.elasticsearch+json; compatible-with=8"
HEADERS = {"accept": _COMPAT, "content-type": _COMPAT}
#: The index template uses ignore_missing_component_templates, new in 8.7.
MIN_VERSION = (8, 7)
# Statuses that mean "not ready yet" (starting node, no master, overloaded): worth a retry.
_TRANSIENT = {429, 502, 503, 504}


@dataclass(frozen=True)
class Connection:
    url: str
    api_key: str | None = None
    username: str | None = None
    password: str | None = None
    ca_certs: str | None = None
    insecure: bool = False
    timeout: float = 10.0

    @property
    def safe_url(self) -> str:
        """The URL without any user:password in it."""
        parts = urllib.parse.urlsplit(self.url)
        if parts.password is None and parts.username is None:
            return self.url
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True)
class Installed:
    kind: str
    name: str
    action: str  # "created" or "updated"
    detail: str = ""


@dataclass
class Report:
    version: str
    cluster: str
    installed: list[Installed] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def make_client(connection: Connection) -> elasticsearch.Elasticsearch:
    options: dict[str, Any] = {
        "request_timeout": connection.timeout,
        # Retrying is the caller's decision (--wait), so a failure shows at once without it.
        "max_retries": 0,
    }
    if connection.api_key:
        options["api_key"] = connection.api_key
    elif connection.username:
        options["basic_auth"] = (connection.username, connection.password or "")
    if connection.ca_certs:
        options["ca_certs"] = connection.ca_certs
    if connection.insecure:
        options["verify_certs"] = False
        options["ssl_show_warn"] = False
    try:
        return elasticsearch.Elasticsearch(connection.url, **options)
    except ValueError as exc:  # a malformed URL
        raise SetupError(f"invalid Elasticsearch URL {connection.safe_url!r}: {exc}") from None


def _reason(exc: elasticsearch.ApiError) -> str:
    body = exc.body
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        return f"{error.get('type', 'error')}: {error.get('reason', '')}".rstrip(": ")
    return str(body or exc.message)


class Installer:
    """Talks to one cluster: waits for it, then PUTs each object, reporting what it did."""

    def __init__(
        self,
        client: elasticsearch.Elasticsearch,
        connection: Connection,
        wait: float = 0.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.connection = connection
        self.sleep = sleep
        self.clock = clock
        self.deadline = Deadline(wait, clock)
        self.wait = wait
        self.notes: list[str] = []

    def call(self, method: str, path: str, body: Any = None, missing_ok: bool = False) -> Any:
        """One request; transient failures are retried until the --wait deadline."""
        url = self.connection.safe_url
        while True:
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", elasticsearch.ElasticsearchWarning)
                    response = self.client.perform_request(method, path, headers=HEADERS, body=body)
                self.notes.extend(str(w.message) for w in caught)
                return response.body
            except elasticsearch.NotFoundError:
                if missing_ok:
                    return None
                raise
            except elasticsearch.AuthenticationException as exc:
                raise SetupError(
                    f"Elasticsearch at {url} refused the credentials ({_reason(exc)}); give "
                    "--api-key or --user/--password (env ELASTICSEARCH_API_KEY, or "
                    "ELASTICSEARCH_USERNAME and ELASTICSEARCH_PASSWORD)"
                ) from None
            except elasticsearch.AuthorizationException as exc:
                raise SetupError(
                    f"{method} {path} was forbidden ({_reason(exc)}): the user needs the cluster "
                    "privileges manage_ilm and manage_index_templates"
                ) from None
            except elasticsearch.UnsupportedProductError:
                raise SetupError(
                    f"the server at {url} is not Elasticsearch (no X-Elastic-Product header)"
                ) from None
            except TlsError as exc:
                raise SetupError(
                    f"TLS with {url} failed: {exc.message}. For a private CA give --ca-certs "
                    "FILE (env ELASTICSEARCH_CA_CERTS); --insecure skips verification"
                ) from None
            except elasticsearch.ApiError as exc:
                if exc.meta.status not in _TRANSIENT or self.deadline.passed():
                    raise SetupError(
                        f"Elasticsearch answered {method} {path} with {exc.meta.status} "
                        f"{_reason(exc)}"
                    ) from None
            except (TransportConnectionError, TransportError) as exc:
                if self.deadline.passed():
                    waited = f" after waiting {self.wait:g}s" if self.wait > 0 else ""
                    raise SetupError(
                        f"cannot reach Elasticsearch at {url}{waited}: {exc.message}"
                    ) from None
            self.sleep(self.deadline.pause(1.0))

    def check_version(self) -> tuple[str, str]:
        info = self.call("GET", "/")
        version = str(info.get("version", {}).get("number", "unknown"))
        try:
            major, minor = (int(part) for part in version.split(".")[:2])
        except ValueError:
            major, minor = MIN_VERSION
        if (major, minor) < MIN_VERSION:
            raise SetupError(
                f"Elasticsearch {version} at {self.connection.safe_url} is too old: the index "
                f"template needs {MIN_VERSION[0]}.{MIN_VERSION[1]} or later"
            )
        return version, str(info.get("cluster_name", ""))

    def put(self, kind: str, path: str, name: str, body: dict[str, Any], detail: str) -> Installed:
        existed = self.call("GET", path, missing_ok=True) is not None
        self.call("PUT", path, body=body)
        return Installed(kind, name, "updated" if existed else "created", detail)

    def stale_data_streams(self) -> list[str]:
        """Data streams matching our pattern that were created from another template."""
        found = self.call("GET", f"/_data_stream/{INDEX_PATTERN}", missing_ok=True) or {}
        return sorted(
            stream["name"]
            for stream in found.get("data_streams", [])
            if stream.get("template") != INDEX_TEMPLATE
        )


def install(
    connection: Connection,
    assets: Assets,
    delete_after: str,
    wait: float = 0.0,
    client: elasticsearch.Elasticsearch | None = None,
) -> Report:
    """Install (or update) the three objects; raises SetupError with a readable reason."""
    policy = assets.ilm_policy(delete_after)
    component = assets.component_template()
    template = assets.index_template()
    installer = Installer(client or make_client(connection), connection, wait)
    version, cluster = installer.check_version()
    report = Report(version, cluster)
    report.installed.append(
        installer.put(
            "ILM policy",
            f"/_ilm/policy/{ILM_POLICY}",
            ILM_POLICY,
            policy,
            f"delete after {delete_after}",
        )
    )
    report.installed.append(
        installer.put(
            "component template",
            f"/_component_template/{urllib.parse.quote(COMPONENT_TEMPLATE)}",
            COMPONENT_TEMPLATE,
            component,
            "mappings for celery.*, event.*, service.*, labels.*",
        )
    )
    report.installed.append(
        installer.put(
            "index template",
            f"/_index_template/{INDEX_TEMPLATE}",
            INDEX_TEMPLATE,
            template,
            f"{', '.join(template['index_patterns'])}, priority {template['priority']}",
        )
    )
    for stream in installer.stale_data_streams():
        report.notes.append(
            f"data stream {stream} was created before this template: roll it over "
            f"(POST {stream}/_rollover) so that new records get these mappings"
        )
    report.notes.extend(installer.notes)
    return report
