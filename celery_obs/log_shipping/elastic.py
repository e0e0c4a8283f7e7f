"""Ship log lines straight into an Elasticsearch data stream, without Logstash in between.

`ElasticsearchSink` is a `Sink` for `ShippingHandler`: the handler batches, retries with backoff
and spools to disk; this module turns one batch into one `_bulk` request (through the client,
for auth, TLS and the product check; REST compatibility pinned to 8 so that 8.x and 9.x clients
both work with Elasticsearch 8 and 9) and sorts the answer per document into stored, to retry,
and refused for good.
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from collections import Counter, deque
from typing import Any

from elasticsearch import ApiError, Elasticsearch

from .sinks import PERMANENT_STATUSES, SinkError

URL_PREFIX = "elasticsearch+"
#: `last_rejection` is shipped inside a log record: keep it readable.
MAX_REJECTION_TEXT = 300
_USERINFO = re.compile(r"//[^/@]*@")
# Index name rules Elasticsearch enforces per document: checked once here, not by refusing every
# record.
_BAD_NAME = re.compile(r'[\\/*?"<>|,#:\s]|^[-_+]|[A-Z]')


def parse_url(url: str) -> tuple[str, tuple[str, str] | None]:
    """(the node URL without credentials, basic auth taken from the URL or None)."""
    parsed = urllib.parse.urlsplit(url.removeprefix(URL_PREFIX))
    try:
        port = parsed.port
    except ValueError:  # not a number, or out of range
        port = None
    if parsed.scheme not in ("http", "https") or not parsed.hostname or port is None:
        shown = _USERINFO.sub("//***@", url)  # the error may be logged: never the password
        raise ValueError(
            "Elasticsearch URL must be [elasticsearch+]http(s)://[user:password@]host:port"
            f"[/path], got {shown!r}"
        )
    host = parsed.netloc.rpartition("@")[2]  # keeps IPv6 brackets
    node = f"{parsed.scheme}://{host}{parsed.path.rstrip('/')}"
    if parsed.username is None:
        return node, None
    user = urllib.parse.unquote(parsed.username)
    return node, (user, urllib.parse.unquote(parsed.password or ""))


#: Per-document statuses worth retrying: throttling, and refusals that hit every record alike.
RETRY_STATUSES = frozenset({403, 404, 429})
#: REST API compatibility 8: Elasticsearch 8 refuses the 9 a 9.x client asks for by default,
#: and Elasticsearch 9 still answers 8-compatible requests.
BULK_HEADERS = {
    "accept": "application/vnd.elasticsearch+json; compatible-with=8",
    "content-type": "application/vnd.elasticsearch+x-ndjson; compatible-with=8",
}


class ElasticsearchSink:
    """Bulk-create each batch of ECS JSON lines in one data stream.

    - The op type is `create` because data streams accept nothing else (they are append-only).
    - No `_id` is sent, so Elasticsearch makes one. When a request times out after Elasticsearch
      stored the batch, the handler's retry stores it again: delivery is at least once. Content
      based ids would dedupe but cost Elasticsearch an id lookup per document on every write.
    - Lines go out byte for byte in the ndjson body: never parsed.
    - Nothing here sleeps or retries (transport retries are off): the handler
      retries with capped backoff and spools meanwhile, which a blocking retry here would defeat.

    A document refused with 429 or 5xx, or any failure of the whole request (unreachable, timeout,
    401/403 credentials), is handed back for retry; so is a per-document 403 or 404 (no privilege
    on the data stream, auto-create disabled): those refuse every record alike and are fixed by
    configuration, and dropping meanwhile would lose everything. Any other refusal of one
    document (a mapping conflict) would fail again: it is counted in `rejected` and
    `rejections` (by error type), described in `last_rejection`, and dropped.
    """

    def __init__(
        self,
        url: str,
        data_stream: str = "logs-celery-default",
        *,
        username: str | None = None,
        password: str | None = None,
        api_key: str | None = None,
        ca_certs: str | None = None,
        verify_certs: bool = True,
        timeout: float = 10.0,
        client: Elasticsearch | None = None,
    ) -> None:
        self.url, url_auth = parse_url(url)
        if not data_stream or _BAD_NAME.search(data_stream):
            raise ValueError(f"not a valid data stream name: {data_stream!r}")
        self.data_stream = data_stream
        self._action = json.dumps({"create": {"_index": data_stream}}).encode() + b"\n"
        self.rejected = 0
        self.last_rejection = ""
        self.rejections: Counter[str] = Counter()
        options: dict[str, Any] = {
            "request_timeout": timeout,
            "max_retries": 0,
            "retry_on_status": (),
            "retry_on_timeout": False,
        }
        if api_key:
            options["api_key"] = api_key
        elif username:
            options["basic_auth"] = (username, password or "")
        elif url_auth:
            options["basic_auth"] = url_auth
        # TLS options mean nothing on http (the client refuses them there), and install() hands
        # the same settings to every output: apply them to https only.
        if self.url.startswith("https:"):
            options["verify_certs"] = verify_certs
            if ca_certs:
                options["ca_certs"] = ca_certs
        self._options = options
        self._owns_client = client is None
        self._client = client if client is not None else Elasticsearch(self.url, **options)
        self._pid = os.getpid()

    def _client_here(self) -> Elasticsearch:
        if self._owns_client and self._pid != os.getpid():
            # A forked pool child must not write on the parent's pooled sockets: open its own.
            # The parent's client is left alone: closing it here could disturb the parent.
            self._client = Elasticsearch(self.url, **self._options)
            self._pid = os.getpid()
        return self._client

    def send(self, lines: list[bytes]) -> None:
        if not lines:
            return
        # A request refused whole as too large (413) is split in halves, down to one document,
        # so that only a document too large on its own is refused.
        chunks: deque[list[bytes]] = deque([lines])
        retry: list[bytes] = []
        reason = ""
        while chunks:
            chunk = chunks.popleft()
            chunk_retry, chunk_reason, too_large = self._bulk(chunk)
            if too_large and len(chunk) > 1:
                half = len(chunk) // 2
                chunks.extendleft((chunk[half:], chunk[:half]))
                continue
            retry += chunk_retry
            reason = reason or chunk_reason
            if chunk_retry and len(chunk_retry) == len(chunk) and chunks:
                # The whole request failed (unreachable, timeout): so would the rest.
                retry += [line for rest in chunks for line in rest]
                break
        if retry:
            raise SinkError(
                f"Elasticsearch: {len(retry)} of {len(lines)} documents to retry ({reason})",
                remaining=None if len(retry) == len(lines) else retry,
            )

    def _bulk(self, lines: list[bytes]) -> tuple[list[bytes], str, bool]:
        """One bulk request: (the lines to retry, why, whether it was refused as too large)."""
        results: list[tuple[bool, dict[str, Any]]] = []
        reason = ""
        action = self._action
        body = b"".join(action + line + b"\n" for line in lines)
        try:
            # The low-level request, so the REST compatibility header is ours (8) with an 8.x
            # or a 9.x client: a 9.x client's bulk() would ask Elasticsearch 8 for 9.
            response = self._client_here().perform_request(
                "POST", "/_bulk", headers=BULK_HEADERS, body=body
            )
            for item in response.body.get("items", []):
                info = next(iter(item.values()))
                status = info.get("status", 500)
                results.append((200 <= status < 300, info))
        except ApiError as exc:  # the request refused whole: every document alike
            info = {"status": exc.status_code, "exception": exc, "error": str(exc)}
            results = [(False, info)] * len(lines)
        # Transport errors (unreachable, timeout), and anything else (a proxy answering 200 with
        # another body) must not kill the handler's thread: every line is retried.
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            results = []
        if (
            len(lines) > 1
            and len(results) == len(lines)
            and all(not ok and "exception" in i and i.get("status") == 413 for ok, i in results)
        ):
            return [], reason, True
        retry: list[bytes] = []
        # Fewer results than lines when the request failed midway: see below the loop.
        for line, (ok, info) in zip(lines, results, strict=False):
            if ok:
                continue
            status = info.get("status", 500)
            if "exception" in info and status in PERMANENT_STATUSES:
                self._reject(info)  # the whole request refused as malformed or too large
            elif "exception" in info or status in RETRY_STATUSES or status >= 500:
                retry.append(line)
                reason = reason or _retry_reason(info)
            else:
                self._reject(info)
        retry += lines[len(results) :]  # no answer for these: not known to be stored
        return retry, reason, False

    def _reject(self, info: dict[str, Any]) -> None:
        error = info.get("error")
        if isinstance(error, dict):
            kind = str(error.get("type", "error"))
            text = f"{kind}: {error.get('reason', '')}"
            cause = error.get("caused_by")
            if isinstance(cause, dict):
                text += f" (caused by {cause.get('type')}: {cause.get('reason')})"
        else:
            kind = f"http_{info.get('status')}"
            text = f"{kind}: {error}"
        self.rejected += 1
        self.rejections[kind] += 1
        self.last_rejection = text[:MAX_REJECTION_TEXT]

    def close(self) -> None:
        if self._owns_client and self._pid == os.getpid():
            self._client.close()


def _retry_reason(info: dict[str, Any]) -> str:
    exc = info.get("exception")
    if exc is not None:  # the whole request failed (an ApiError from the client)
        status = getattr(exc, "status_code", info.get("status"))
        hint = "; check the credentials and privileges" if status in (401, 403) else ""
        return f"HTTP {status} on the bulk request: {getattr(exc, 'error', exc)}{hint}"
    error = info.get("error")
    kind = error.get("type") if isinstance(error, dict) else error
    return f"{info.get('status')} {kind}"
