"""ElasticsearchSink over HTTP against a fake Elasticsearch (and a real one when
ELASTICSEARCH_URL is set): stored records arrive once, throttled ones are retried, refused ones
are counted and reported, outages lose nothing and keep order."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import elasticsearch
import pytest

from celery_obs.log_shipping.elastic import ElasticsearchSink, parse_url
from celery_obs.log_shipping.formatter import EcsJsonFormatter
from celery_obs.log_shipping.shipper import ShippingHandler
from celery_obs.log_shipping.sinks import SinkError

from support import free_port, wait_for

# Every request pins REST compatibility 8, whichever client is installed.
MAJOR = "8"
JSON_TYPE = f"application/vnd.elasticsearch+json; compatible-with={MAJOR}"
NDJSON_TYPE = f"application/vnd.elasticsearch+x-ndjson; compatible-with={MAJOR}"
DATA_STREAM = "logs-celery-test"

ERRORS: dict[int, dict[str, Any]] = {
    400: {
        "type": "mapper_parsing_exception",
        "reason": "failed to parse field [celery.task.retries] of type [long] in document with "
        "id 'Xz1'. Preview of field's value: '" + "many " * 60 + "'",
        "caused_by": {"type": "illegal_argument_exception", "reason": 'For input string: "many"'},
    },
    401: {"type": "security_exception", "reason": "unable to authenticate user [shipper]"},
    403: {
        "type": "security_exception",
        "reason": "action [indices:data/write/bulk[s]] is unauthorized for user [shipper]",
    },
    404: {"type": "index_not_found_exception", "reason": "no such index [logs-celery-test]"},
    429: {"type": "es_rejected_execution_exception", "reason": "rejected execution of bulk"},
    503: {"type": "unavailable_shards_exception", "reason": "primary shard is not active"},
    413: {"type": "content_too_long", "reason": "request body is too large"},
}


@dataclass
class BulkRequest:
    method: str
    path: str
    headers: Message
    actions: list[dict[str, Any]]
    sources: list[bytes]
    status: int  # of the whole response


class FakeElasticsearch:
    """Enough of Elasticsearch for the client's bulk helper, on 127.0.0.1.

    Each bulk request fails whole with the next status in `request_statuses`, if any; otherwise
    `item_status(source)` answers each document (201 stores it). With `hang`, a request stores
    its documents and answers only after `release`: the client has given up by then.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests: list[BulkRequest] = []
        self.stored: list[bytes] = []
        self.request_statuses: list[int] = []
        self.max_body: int | None = None  # larger bulk bodies are refused whole with 413
        self.item_status: Callable[[bytes], int] = lambda source: 201
        self.hang = False
        self.release = threading.Event()
        self.server: ThreadingHTTPServer | None = None

    def bulk(
        self, method: str, path: str, headers: Message, body: bytes
    ) -> tuple[int, dict[str, Any]]:
        lines = body.splitlines()
        actions, sources = [json.loads(a) for a in lines[0::2]], lines[1::2]
        too_large = self.max_body is not None and len(body) > self.max_body
        if self.request_statuses or too_large:
            status = 413 if too_large else self.request_statuses.pop(0)
            self.requests.append(BulkRequest(method, path, headers, actions, sources, status))
            error = ERRORS[status]
            return status, {"error": {"root_cause": [error], **error}, "status": status}
        self.requests.append(BulkRequest(method, path, headers, actions, sources, 200))
        items = []
        for action, source in zip(actions, sources, strict=True):
            item: dict[str, Any] = {"_index": f".ds-{action['create']['_index']}-000001"}
            item["status"] = self.item_status(source)
            if item["status"] == 201:
                self.stored.append(source)
                item.update(_id=uuid.uuid4().hex, result="created", _version=1)
            else:
                item["error"] = ERRORS[item["status"]]
            items.append({"create": item})
        if self.hang:
            self.release.wait(30)
        return 200, {
            "took": 1,
            "errors": any("error" in i["create"] for i in items),
            "items": items,
        }

    def start(self) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.answer(200, {"name": "fake", "version": {"number": f"{MAJOR}.0.0"}})

            def do_POST(self) -> None:  # _bulk takes POST or PUT; client 9 sends PUT
                body = self.rfile.read(int(self.headers["Content-Length"]))
                self.answer(*fake.bulk(self.command, self.path, self.headers, body))

            do_PUT = do_POST

            def answer(self, status: int, document: dict[str, Any]) -> None:
                data = json.dumps(document).encode()
                with contextlib.suppress(OSError):  # a client that timed out has hung up
                    self.send_response(status)
                    self.send_header("X-Elastic-Product", "Elasticsearch")
                    self.send_header("Content-Type", JSON_TYPE)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()
        self.server = None

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(source) for source in self.stored]


@pytest.fixture
def fake() -> Iterator[FakeElasticsearch]:
    fake = FakeElasticsearch()
    fake.start()
    yield fake
    fake.release.set()
    if fake.server is not None:
        fake.stop()


@pytest.fixture
def ship(tmp_path: Path) -> Iterator[Callable[[ElasticsearchSink], logging.Logger]]:
    """A logger whose only handler is a ShippingHandler around the given sink."""
    handlers: list[ShippingHandler] = []

    def make(sink: ElasticsearchSink) -> logging.Logger:
        handler = ShippingHandler(
            sink, str(tmp_path / "spool"), flush_interval=0.05, backoff_cap=0.2
        )
        handler.setFormatter(EcsJsonFormatter(service_name="es-test"))
        handlers.append(handler)
        logger = logging.getLogger(f"es-ship.{uuid.uuid4().hex}")
        logger.handlers = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False
        return logger

    yield make
    for handler in handlers:
        handler.close()


def numbers(records: list[dict[str, Any]]) -> list[int]:
    return [int(r["message"]) for r in records if r["message"].isdigit()]


def basic(credentials: str) -> str:
    return "Basic " + base64.b64encode(credentials.encode()).decode()


# Odd spacing, raw UTF-8 and escapes: each line must reach Elasticsearch byte for byte.
LINES = [
    json.dumps({"message": "café", "n": 0}, ensure_ascii=False).encode(),
    b'{"message":  "spaced",\t"n": 1}',
    b'{"@timestamp":"2026-01-01T00:00:00.000Z","message":"\\u00e9\\nline","n":2}',
]


@pytest.mark.parametrize(
    ("userinfo", "options", "authorization"),
    [
        ("shipper:s3cr%40t@", {}, basic("shipper:s3cr@t")),
        ("ignored:x@", {"username": "shipper", "password": "s3cret"}, basic("shipper:s3cret")),
        ("ignored:x@", {"api_key": "a2V5OnNlY3JldA=="}, "ApiKey a2V5OnNlY3JldA=="),
        ("", {}, None),
    ],
)
def test_one_bulk_request_creates_each_line_unchanged(
    fake: FakeElasticsearch, userinfo: str, options: dict[str, Any], authorization: str | None
) -> None:
    sink = ElasticsearchSink(
        f"elasticsearch+http://{userinfo}127.0.0.1:{fake.port}", DATA_STREAM, **options
    )
    sink.send(LINES)
    sink.close()
    [request] = fake.requests
    assert request.method in ("POST", "PUT")  # both are _bulk's; client 8 POSTs, 9 PUTs
    assert request.path == "/_bulk"
    assert request.actions == [{"create": {"_index": DATA_STREAM}}] * 3
    assert request.sources == LINES
    assert request.headers["Content-Type"] == NDJSON_TYPE
    assert request.headers["Authorization"] == authorization
    assert fake.stored == LINES
    assert (sink.rejected, sink.rejections) == (0, Counter())


def test_only_retryable_documents_come_back_in_order(fake: FakeElasticsearch) -> None:
    lines = [b'{"n":%d}' % n for n in range(7)]
    # 403/404 per document (a missing privilege, auto-create off) refuse every record alike
    # until the cluster is fixed: retried, not dropped.
    statuses = {1: 429, 2: 400, 4: 503, 5: 403, 6: 404}
    fake.item_status = lambda source: statuses.get(json.loads(source)["n"], 201)
    sink = ElasticsearchSink(fake.url, DATA_STREAM)
    with pytest.raises(SinkError) as failure:
        sink.send(lines)
    assert failure.value.remaining == [lines[1], lines[4], lines[5], lines[6]]
    assert str(failure.value) == (
        "Elasticsearch: 4 of 7 documents to retry (429 es_rejected_execution_exception)"
    )
    assert fake.stored == [lines[0], lines[3]]
    assert sink.rejected == 1
    assert sink.rejections == Counter({"mapper_parsing_exception": 1})

    sink.send([lines[2]])  # refused for good: nothing to retry, so no error
    mapping = ERRORS[400]
    described = (
        f"mapper_parsing_exception: {mapping['reason']} (caused by illegal_argument_exception: "
        'For input string: "many")'
    )
    assert sink.last_rejection == described[:300]
    assert len(sink.last_rejection) == 300
    assert sink.rejected == 2


def test_a_document_too_large_for_the_cluster_is_refused_alone(fake: FakeElasticsearch) -> None:
    """A request over http.max_content_length is refused whole (413): split in halves until
    the document too large on its own is the only one refused."""
    fake.max_body = 10_000
    lines = [b'{"n":%d}' % n for n in range(10)]
    lines[6] = b'{"n":6,"big":"%s"}' % (b"x" * 20_000)
    sink = ElasticsearchSink(fake.url, DATA_STREAM)
    sink.send(lines)  # nothing to retry: no error
    assert fake.stored == [line for n, line in enumerate(lines) if n != 6]
    assert sink.rejected == 1
    assert sink.rejections == Counter({"http_413": 1})


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (503, "HTTP 503 on the bulk request: unavailable_shards_exception"),
        (
            401,
            "HTTP 401 on the bulk request: security_exception; check the credentials and "
            "privileges",
        ),
        (
            403,
            "HTTP 403 on the bulk request: security_exception; check the credentials and "
            "privileges",
        ),
    ],
)
def test_a_failed_request_keeps_every_line(
    fake: FakeElasticsearch, status: int, reason: str
) -> None:
    fake.request_statuses = [status]
    sink = ElasticsearchSink(fake.url, DATA_STREAM)
    with pytest.raises(SinkError) as failure:
        sink.send(LINES)
    assert failure.value.remaining is None
    assert str(failure.value) == f"Elasticsearch: 3 of 3 documents to retry ({reason})"
    assert fake.stored == []
    sink.send(LINES)
    assert fake.stored == LINES
    assert sink.rejected == 0


def test_an_unreachable_cluster_keeps_every_line() -> None:
    sink = ElasticsearchSink(f"http://127.0.0.1:{free_port()}", DATA_STREAM, timeout=2)
    with pytest.raises(SinkError, match=r"^Elasticsearch: 3 of 3 documents to retry \(Connection"):
        sink.send(LINES)


def test_a_timeout_after_storing_duplicates_on_retry(fake: FakeElasticsearch) -> None:
    """The documented at-least-once: no _id, so Elasticsearch cannot tell a resend."""
    fake.hang = True
    sink = ElasticsearchSink(fake.url, DATA_STREAM, timeout=0.5)
    with pytest.raises(SinkError, match="ConnectionTimeout") as failure:
        sink.send(LINES)
    assert failure.value.remaining is None
    assert fake.stored == LINES  # stored, though the client gave up waiting
    fake.hang = False
    fake.release.set()
    sink.send(LINES)
    assert fake.stored == LINES + LINES


def test_throttled_records_are_retried_and_a_refused_one_is_reported(
    fake: FakeElasticsearch, ship: Callable[[ElasticsearchSink], logging.Logger]
) -> None:
    throttled, seen = {"10", "11", "150"}, set[str]()

    def status(source: bytes) -> int:
        message = json.loads(source)["message"]
        if message == "bad":
            return 400
        if message in throttled and message not in seen:
            seen.add(message)  # throttled on the first attempt only
            return 429
        return 201

    fake.item_status = status
    sink = ElasticsearchSink(fake.url, DATA_STREAM, timeout=2)
    logger = ship(sink)
    for i in range(200):
        if i == 50:
            logger.info("bad")
        logger.info("%d", i)

    def reports() -> list[dict[str, Any]]:
        return [r for r in fake.records() if r.get("event", {}).get("action")]

    wait_for(lambda: len(numbers(fake.records())) == 200 and reports(), 30, "records and report")
    stored = numbers(fake.records())
    assert seen == throttled
    assert sorted(stored) == list(range(200))  # every good record, exactly once
    # Elasticsearch stores the rest of a batch before a throttled record's retry, so only
    # records never throttled keep their order in the index; on the wire, first sends do.
    assert [n for n in stored if str(n) not in throttled] == [
        n for n in range(200) if str(n) not in throttled
    ]
    first_sends = list(
        dict.fromkeys(json.loads(s)["message"] for r in fake.requests for s in r.sources)
    )
    assert first_sends[:201] == [*map(str, range(50)), "bad", *map(str, range(50, 200))]
    sent_bad = [s for r in fake.requests for s in r.sources if json.loads(s)["message"] == "bad"]
    assert len(sent_bad) == 1  # refused for good: never resent
    assert sink.rejected == 1
    assert sink.rejections == Counter({"mapper_parsing_exception": 1})
    [report] = reports()
    assert report["event"] == {"action": "log-records-rejected", "outcome": "failure"}
    assert report["labels"] == {"log_records_rejected": 1}
    assert sink.last_rejection in report["message"]


def test_a_failed_request_is_resent_whole_and_in_order(
    fake: FakeElasticsearch, ship: Callable[[ElasticsearchSink], logging.Logger]
) -> None:
    fake.request_statuses = [503, 503]
    logger = ship(ElasticsearchSink(fake.url, DATA_STREAM, timeout=2))
    for i in range(100):
        logger.info("%d", i)
    wait_for(lambda: len(fake.stored) >= 100, 30, "100 records after two 503s")
    assert [r.status for r in fake.requests[:3]] == [503, 503, 200]
    assert numbers(fake.records()) == list(range(100))


def test_an_outage_is_spooled_then_delivered_once_in_order(
    fake: FakeElasticsearch, ship: Callable[[ElasticsearchSink], logging.Logger]
) -> None:
    logger = ship(ElasticsearchSink(fake.url, DATA_STREAM, timeout=2))
    handler = logger.handlers[0]
    assert isinstance(handler, ShippingHandler)
    for i in range(100):
        logger.info("%d", i)
    wait_for(lambda: len(fake.stored) == 100, 30, "the first 100 records")

    fake.stop()  # Elasticsearch goes away while the logging goes on
    for i in range(100, 300):
        logger.info("%d", i)
    wait_for(lambda: handler.spooled > 0, 30, "spooling")
    fake.start()
    for i in range(300, 400):
        logger.info("%d", i)
    wait_for(lambda: len(fake.stored) >= 400, 30, "every record after the outage")
    assert numbers(fake.records()) == list(range(400))
    assert handler.dropped == 0


@pytest.mark.parametrize(
    ("url", "options", "error"),
    [
        ("tcp://es:9200", {}, "host:port"),
        ("elasticsearch+ftp://es:9200", {}, "host:port"),
        ("http://es", {}, "host:port"),  # the client needs the port: 80 or 9200 is a guess
        ("http://:9200", {}, "host:port"),
        ("https://es:92000", {}, "host:port"),
        ("http://es:9200", {"data_stream": "logs-Celery"}, "data stream"),
    ],
)
def test_bad_configuration_is_refused(url: str, options: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        ElasticsearchSink(url, **options)


def test_a_refused_url_never_shows_its_password() -> None:
    with pytest.raises(ValueError, match="Elasticsearch URL must be") as failure:
        ElasticsearchSink("http://shipper:hunter2@es")
    assert "hunter2" not in str(failure.value)
    assert "//***@es" in str(failure.value)


REAL = os.environ.get("ELASTICSEARCH_URL", "")


@pytest.mark.skipif(
    not REAL,
    reason="no real cluster: set ELASTICSEARCH_URL (auth: ELASTICSEARCH_API_KEY or "
    "ELASTICSEARCH_USERNAME/ELASTICSEARCH_PASSWORD; ELASTICSEARCH_CA_CERTS optional)",
)
def test_a_real_cluster_stores_every_record(
    ship: Callable[[ElasticsearchSink], logging.Logger],
) -> None:
    env = os.environ
    auth: dict[str, Any] = {
        "api_key": env.get("ELASTICSEARCH_API_KEY") or None,
        "username": env.get("ELASTICSEARCH_USERNAME") or None,
        "password": env.get("ELASTICSEARCH_PASSWORD") or None,
        "ca_certs": env.get("ELASTICSEARCH_CA_CERTS") or None,
    }
    data_stream = f"logs-celery-test{uuid.uuid4().hex[:12]}"  # matches the built-in logs-*-*
    node, url_auth = parse_url(REAL)
    admin_auth: dict[str, Any] = {"basic_auth": url_auth}
    if auth["api_key"]:
        admin_auth = {"api_key": auth["api_key"]}
    elif auth["username"]:
        admin_auth = {"basic_auth": (auth["username"], auth["password"] or "")}
    if auth["ca_certs"]:
        admin_auth["ca_certs"] = auth["ca_certs"]
    admin = elasticsearch.Elasticsearch(node, **admin_auth)
    sink = ElasticsearchSink(REAL, data_stream, **auth)
    logger = ship(sink)
    handler = logger.handlers[0]
    assert isinstance(handler, ShippingHandler)
    run = uuid.uuid4().hex
    try:
        for i in range(1000):
            task = {"name": "tests.add", "id": f"{run}-{i}"}
            logger.info("record %d", i, extra={"ecs": {"celery": {"task": task}}})
        wait_for(lambda: handler.sent >= 1000, 60, "1000 records shipped")
        assert (sink.rejected, sink.last_rejection) == (0, "")
        admin.indices.refresh(index=data_stream)
        assert admin.count(index=data_stream)["count"] == 1000
        expected = {
            "message": ["record 500"],
            "log.level": ["info"],
            "service.name": ["es-test"],
            "celery.task.name": ["tests.add"],
            "celery.task.id": [f"{run}-500"],
        }
        # The fields API, not _source: logs-*-* may use LogsDB, whose _source is synthetic.
        found = admin.search(
            index=data_stream,
            query={"term": {"celery.task.id": f"{run}-500"}},
            fields=[{"field": name} for name in expected],
            source=False,
        )
        [hit] = found["hits"]["hits"]
        assert hit["fields"] == expected
    finally:
        admin.options(ignore_status=404).indices.delete_data_stream(name=data_stream)
        admin.close()
