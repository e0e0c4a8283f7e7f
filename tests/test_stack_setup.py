"""The Elasticsearch templates and Kibana objects, and `celery-obs setup` that installs them.

Elasticsearch and Kibana cannot run here: the mappings are checked against real records that
log_shipping writes (every leaf must land on a mapping of a compatible type), the setup
commands against small fake servers on 127.0.0.1, and the live tests run only when
ELASTICSEARCH_URL / KIBANA_URL name real ones.
"""

from __future__ import annotations

import base64
import fnmatch
import io
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from datetime import datetime, timezone
from email.parser import BytesParser
from email.policy import default as email_policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from exporter.cli import main
from log_shipping.context import TaskContextFilter
from log_shipping.formatter import EcsJsonFormatter
from log_shipping.lifecycle import Lifecycle
from log_shipping.redact import Redactor
from stack_setup import assets as names
from stack_setup import kibana_objects
from stack_setup.assets import Assets, find_assets

from support import free_port, wait_for

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Assets(ROOT)
COMPONENT = ASSETS.component_template()
MAPPINGS = COMPONENT["template"]["mappings"]
#: Fields we leave to what every logs-* data stream maps anyway (documented, not guessed).
BUILTIN = {"@timestamp": {"type": "date"}}  # data streams map @timestamp as date by default
COMPAT_ACCEPT = "application/vnd.elasticsearch+json; compatible-with=8"


# -- real records ----------------------------------------------------------------------------


class FakeSink:
    """Stands in for the HTTP/Elasticsearch sink; reports two records refused for good."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.rejected = 2
        self.last_rejection = "mapper_parsing_exception: failed to parse field"

    def send(self, lines: list[bytes]) -> None:
        self.lines.extend(lines)

    def close(self) -> None:
        pass


def _traceback() -> Any:
    try:
        raise ValueError("bad value")
    except ValueError as exc:
        return exc.__traceback__


def _lifecycle_records() -> list[dict[str, Any]]:
    """Every lifecycle step, arguments on, through the real formatter and filter."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(EcsJsonFormatter(service_name="svc", hostname="host-1"))
    handler.addFilter(TaskContextFilter())
    lifecycle_logger = logging.getLogger("celery_obs.lifecycle")
    task_logger = logging.getLogger("tests.stack_setup.task")
    saved = [(lg, lg.level, lg.propagate) for lg in (lifecycle_logger, task_logger)]
    for lg in (lifecycle_logger, task_logger):
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
        lg.propagate = False
    deep: dict[str, Any] = {"leaf": 1}
    for level in range(8):  # deeper than the redactor's limit: the tail becomes "[...]"
        deep = {f"level{level}": deep}
    request = SimpleNamespace(
        id="t-1",
        delivery_info={"routing_key": "emails"},
        retries=2,
        root_id="root-1",
        parent_id="parent-1",
        eta=datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=timezone.utc),
        hostname="celery@worker-1",
        args=[1, "two", 3.5, None, True, {"nested": {"deep": [1, "x"]}}, [4, [5, 6]], "x" * 300],
        kwargs={
            "password": "hunter2",
            "user": {"id": 7, "roles": ["a", "b"], "name": 3},
            "when": "2024-01-01",
            "items": [{"sku": 1}, {"sku": "two"}],
            "n": None,
            "deep": deep,
        },
    )
    task = SimpleNamespace(name="proj.send_email", request=request)
    string_eta = SimpleNamespace(**{**vars(request), "id": "t-7", "eta": "2024-05-01T12:00:00"})
    lifecycle = Lifecycle(Redactor())
    try:
        lifecycle.on_prerun(sender=task, task_id="t-1", task=task)
        task_logger.info("inside the task")
        try:
            raise KeyError("missing")
        except KeyError:
            task_logger.exception("lookup failed inside the task")
        lifecycle.on_success(sender=task, result=1, runtime=12.5)
        lifecycle.on_postrun()
        lifecycle.on_prerun(sender=task, task_id="t-1", task=task)
        lifecycle.on_success(sender=task, result=1)  # runtime from our own clock
        lifecycle.on_postrun()
        lifecycle.on_prerun(sender=task, task_id="t-2", task=task)
        lifecycle.on_failure(
            sender=task,
            task_id="t-2",
            exception=ValueError("bad value"),
            einfo=SimpleNamespace(tb=_traceback()),
        )
        lifecycle.on_retry(sender=task, request=request, reason="Retry in 1s")
        lifecycle.on_revoked(
            sender=task,
            request=SimpleNamespace(**{**vars(request), "id": "t-3", "task_name": "proj.x"}),
            terminated=True,
            signum=15,
            expired=False,
        )
        lifecycle.on_rejected(
            message=SimpleNamespace(headers={"id": "t-4", "task": "proj.y"}),
            exc=RuntimeError("bad message"),
        )
        lifecycle.on_unknown(name="proj.missing", id="t-5")
        lifecycle.on_internal_error(
            sender=task, task_id="t-6", request=request, exception=KeyError("k"), einfo=None
        )
        lifecycle.on_prerun(
            sender=SimpleNamespace(name="proj.later", request=string_eta),
            task_id="t-7",
            task=SimpleNamespace(name="proj.later", request=string_eta),
        )
        task_logger.warning("user labels", extra={"ecs": {"labels": {"a": 1, "b": "x", "c": True}}})
    finally:
        lifecycle.on_postrun()  # the task context is per thread: leave none behind
        for lg, level, propagate in saved:
            lg.removeHandler(handler)
            lg.setLevel(level)
            lg.propagate = propagate
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def _shipper_reports(spool: Path) -> list[dict[str, Any]]:
    """The records the shipper writes about itself (lines dropped, lines refused)."""
    from log_shipping.shipper import ShippingHandler

    sink = FakeSink()
    handler = ShippingHandler(sink, str(spool), flush_interval=0.05)
    handler.setFormatter(EcsJsonFormatter(service_name="svc", hostname="host-1"))
    handler.dropped = 3  # as if the in-memory queue had overflowed
    handler.emit(logging.LogRecord("x", logging.INFO, __file__, 1, "a line", None, None))

    def reports() -> list[dict[str, Any]]:
        records = [json.loads(line) for line in list(sink.lines)]
        return [r for r in records if r.get("log", {}).get("logger") == "celery_obs.log_shipping"]

    try:
        return wait_for(lambda: len(reports()) >= 2 and reports(), 10, "the shipper's reports")
    finally:
        handler.close()


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _lifecycle_records() + _shipper_reports(tmp_path_factory.mktemp("spool"))


# -- a small model of how Elasticsearch maps a document --------------------------------------


def mapping_at(path: tuple[str, ...]) -> dict[str, Any] | None:
    node: dict[str, Any] = {"properties": MAPPINGS["properties"]}
    for part in path:
        child = node.get("properties", {}).get(part)
        if child is None:
            return None
        node = child
    return node


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "long"
    if isinstance(value, float):
        return "double"
    if isinstance(value, str):
        return "string"
    return "object"


def dynamic_mapping(dotted: str, value: Any) -> dict[str, Any] | None:
    """What our dynamic templates (or the data stream defaults) give an unmapped field."""
    if dotted in BUILTIN:
        return BUILTIN[dotted]
    for entry in MAPPINGS["dynamic_templates"]:
        (spec,) = entry.values()
        if fnmatch.fnmatchcase(dotted, spec["path_match"]) and spec.get(
            "match_mapping_type", _json_type(value)
        ) == _json_type(value):
            return spec["mapping"]
    return None


def _date(value: Any) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return True  # epoch_millis
    try:
        datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


ACCEPTS = {
    "keyword": lambda v: isinstance(v, (str, int, float, bool)),
    "constant_keyword": lambda v: isinstance(v, str),
    "match_only_text": lambda v: isinstance(v, str),
    "text": lambda v: isinstance(v, str),
    "wildcard": lambda v: isinstance(v, str),
    "long": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": _number,
    "double": _number,
    "boolean": lambda v: isinstance(v, bool),
    "date": _date,
}


def check_document(doc: dict[str, Any], seen: set[str] | None = None) -> list[str]:
    """Problems Elasticsearch would have with `doc` under our mappings (empty: it indexes)."""
    problems: list[str] = []
    seen = set() if seen is None else seen

    def walk(value: Any, path: tuple[str, ...], dynamic_parent: bool) -> None:
        dotted = ".".join(path)
        node = mapping_at(path) if path else {"properties": MAPPINGS["properties"]}
        if node is None and not isinstance(value, dict):
            node = dynamic_mapping(dotted, value)
        if node is None and isinstance(value, (dict, list)) and dynamic_parent:
            node = {"properties": {}}  # a new object under a mapped one: mapped dynamically
        if node is None:
            problems.append(f"{dotted}: not mapped (the record has {value!r})")
            return
        seen.add(dotted)
        kind = node.get("type", "object")
        if value is None:
            return
        if isinstance(value, list):
            for item in value:
                walk(item, path, dynamic_parent)
            return
        if kind == "flattened":
            if not isinstance(value, dict):
                problems.append(f"{dotted}: flattened takes objects only, the record has {value!r}")
            return
        if kind == "object" and node.get("enabled") is False:
            return  # kept in _source, not parsed: anything goes
        if isinstance(value, dict):
            if kind != "object":
                problems.append(f"{dotted}: mapped as {kind}, the record has an object")
                return
            for key, child in value.items():
                walk(child, (*path, *key.split(".")), True)
            return
        if kind == "object":
            problems.append(f"{dotted}: mapped as an object, the record has {value!r}")
        elif kind not in ACCEPTS:
            problems.append(f"{dotted}: no rule for mapping type {kind}")
        elif not ACCEPTS[kind](value):
            problems.append(f"{dotted}: mapped as {kind}, the record has {value!r}")

    walk(doc, (), False)
    return problems


def test_the_mapping_check_catches_clashes() -> None:
    assert check_document({"celery": {"task": {"id": {"x": 1}}}}) == [
        "celery.task.id: mapped as keyword, the record has an object"
    ]
    assert check_document({"celery": {"task": {"retries": "x"}}}) == [
        "celery.task.retries: mapped as long, the record has 'x'"
    ]
    assert check_document({"event": "x"}) == ["event: mapped as an object, the record has 'x'"]
    assert check_document({"celery": {"task": {"kwargs": [1]}}}) == [
        "celery.task.kwargs: flattened takes objects only, the record has 1"
    ]
    assert check_document({"celery": {"task": {"new": 1}}}) == [
        "celery.task.new: not mapped (the record has 1)"
    ]
    assert check_document({"celery": {"task": {"eta": "soon"}}}) == [
        "celery.task.eta: mapped as date, the record has 'soon'"
    ]
    assert check_document({"labels": {"anything": 2.5}, "celery": {"task": {"args": [{}]}}}) == []


def test_every_field_log_shipping_writes_has_a_compatible_mapping(records) -> None:
    seen: set[str] = set()
    problems = [p for record in records for p in check_document(record, seen)]
    assert problems == []
    # The corpus really exercised the awkward fields (a check over nothing proves nothing).
    assert {
        "@timestamp",
        "log.level",
        "ecs.version",
        "log.origin.file.line",
        "error.stack_trace",
        "event.duration",
        "event.category",
        "celery.task.args",
        "celery.task.kwargs",
        "celery.task.eta",
        "celery.task.runtime",
        "celery.task.retries",
        "celery.task.terminated",
        "celery.worker.hostname",
        "labels.a",
        "labels.c",
        "labels.log_records_dropped",
        "labels.log_records_rejected",
        "process.thread.id",
    } <= seen
    actions = {r.get("event", {}).get("action") for r in records}
    assert {
        "task-started",
        "task-succeeded",
        "task-failed",
        "task-retried",
        "task-revoked",
        "task-rejected",
        "task-unknown",
        "task-internal-error",
        "log-records-dropped",
        "log-records-rejected",
    } <= actions


def test_celery_event_and_service_fields_are_mapped_explicitly(records) -> None:
    """Not left to dynamic mapping, whose guess depends on the first record seen."""
    seen: set[str] = set()
    for record in records:
        check_document(record, seen)
    ours = [p for p in seen if p.split(".")[0] in ("celery", "event", "service")]
    assert ours
    for dotted in ours:
        node = mapping_at(tuple(dotted.split(".")))
        assert node is not None, dotted
        assert "type" in node or "properties" in node, dotted


def test_args_and_kwargs_mappings_take_every_shape_the_redactor_returns() -> None:
    redact = Redactor(max_length=8)
    for args in ([], [1, "x", None], [{"a": 1}, [1, [2]], "y" * 50], [True, 2.5]):
        for kwargs in ({}, {"a": {"b": [1, {"c": "d"}]}, "password": "p"}, {"n": None}):
            doc = {"celery": {"task": {"args": redact(args), "kwargs": redact(kwargs)}}}
            assert check_document(doc) == []


# -- the template files ----------------------------------------------------------------------


def test_index_template_composes_ours_over_the_builtin_logs_templates() -> None:
    template = ASSETS.index_template()
    assert template["index_patterns"] == [names.INDEX_PATTERN] == ["logs-celery-*"]
    assert template["data_stream"] == {}
    assert (
        template["allow_auto_create"] is True
    )  # as the built-in logs template: Logstash creates it
    assert template["priority"] > 100  # the built-in logs-*-* template's priority
    composed = template["composed_of"]
    assert composed.index(names.COMPONENT_TEMPLATE) > composed.index("ecs@mappings")
    assert composed.index(names.COMPONENT_TEMPLATE) > composed.index("logs@settings")
    for builtin in ("logs@mappings", "logs@settings", "ecs@mappings"):
        assert builtin in composed and builtin in template["ignore_missing_component_templates"]
    assert names.COMPONENT_TEMPLATE not in template["ignore_missing_component_templates"]
    assert set(template["ignore_missing_component_templates"]) <= set(composed)
    settings = template["template"]["settings"]
    assert settings["index"]["lifecycle"]["name"] == names.ILM_POLICY


def test_ilm_policy_rolls_over_and_deletes_after_the_given_age() -> None:
    policy = ASSETS.ilm_policy("45d")["policy"]
    rollover = policy["phases"]["hot"]["actions"]["rollover"]
    assert rollover["max_age"] == "1d" and rollover["max_primary_shard_size"] == "50gb"
    assert policy["phases"]["delete"] == {"min_age": "45d", "actions": {"delete": {}}}
    assert ASSETS.ilm_policy()["policy"]["phases"]["delete"]["min_age"] == "30d"
    raw = (ROOT / "elasticsearch/ilm-policy.json").read_text()
    assert raw.count(names.DELETE_AFTER_PLACEHOLDER) == 1
    for bad in ("30 days", "0d", "-1d", "30", "1w"):
        with pytest.raises(ValueError, match="whole number and a unit"):
            ASSETS.ilm_policy(bad)


def test_component_template_maps_the_celery_fields_as_specified() -> None:
    def kind(dotted: str) -> str | None:
        node = mapping_at(tuple(dotted.split(".")))
        return None if node is None else node.get("type", "object")

    for field in ("id", "name", "state", "queue", "root_id", "parent_id"):
        assert kind(f"celery.task.{field}") == "keyword"
    assert kind("celery.task.runtime") == "float"
    assert kind("celery.task.retries") == "long"
    assert kind("celery.task.eta") == "date"
    assert kind("celery.task.kwargs") == "flattened"
    assert mapping_at(("celery", "task", "args")) == {"type": "object", "enabled": False}
    assert kind("celery.worker.hostname") == "keyword"
    assert (kind("event.action"), kind("event.outcome"), kind("event.duration")) == (
        "keyword",
        "keyword",
        "long",
    )
    assert kind("service.name") == "keyword"
    assert kind("labels.log_records_dropped") == kind("labels.log_records_rejected") == "long"
    # ECS: labels are keywords, whatever JSON type a record gives them.
    for value in ("x", 1, 1.5, True):
        assert (dynamic_mapping("labels.anything", value) or {}).get("type") == "keyword"


def test_data_stream_names_agree_with_log_shipping() -> None:
    from log_shipping.hooks import LogConfig

    default = getattr(LogConfig(), "data_stream", None)
    if default is None:
        pytest.skip("log_shipping has no Elasticsearch data stream setting")
    assert fnmatch.fnmatchcase(default, names.INDEX_PATTERN)
    assert default == names.data_stream_name()


def test_assets_are_found_from_flag_environment_or_checkout(tmp_path) -> None:
    assert find_assets(None, {}) == ROOT
    assert find_assets(str(ROOT), {}) == ROOT
    assert find_assets(None, {"CELERY_OBS_ASSETS": str(ROOT)}) == ROOT
    with pytest.raises(names.AssetsError, match=r"--assets .*elasticsearch/ and kibana/"):
        find_assets(str(tmp_path), {})
    with pytest.raises(names.AssetsError, match="CELERY_OBS_ASSETS"):
        find_assets(None, {"CELERY_OBS_ASSETS": str(tmp_path)})


# -- fake servers ----------------------------------------------------------------------------


class FakeServer:
    """An HTTP server on 127.0.0.1 that records requests and answers from `respond`."""

    def __init__(self) -> None:
        self.requests: list[SimpleNamespace] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                request = SimpleNamespace(
                    method=self.command,
                    path=self.path,
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=self.rfile.read(length) if length else b"",
                )
                server.requests.append(request)
                status, headers, body = server.respond(request)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                payload = json.dumps(body).encode()
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_HEAD = _handle

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def respond(self, request: SimpleNamespace) -> tuple[int, dict[str, str], Any]:
        raise NotImplementedError

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class FakeElasticsearch(FakeServer):
    def __init__(self, version: str = "8.13.4", **behaviour: Any) -> None:
        self.version = version
        self.stored: dict[str, Any] = {}
        self.data_streams: list[dict[str, str]] = []
        self.unavailable = behaviour.pop("unavailable", 0)
        self.reject_auth = behaviour.pop("reject_auth", False)
        self.product = behaviour.pop("product", "Elasticsearch")
        super().__init__()

    def respond(self, request: SimpleNamespace) -> tuple[int, dict[str, str], Any]:
        headers = {"X-Elastic-Product": self.product} if self.product else {}
        if self.unavailable:
            self.unavailable -= 1
            return 503, headers, {"error": {"type": "master_not_discovered_exception"}}
        if self.reject_auth:
            error = {"type": "security_exception", "reason": "unable to authenticate user [u]"}
            return 401, headers, {"error": error, "status": 401}
        path = urllib.parse.unquote(request.path)
        if path == "/":
            return 200, headers, {"cluster_name": "fake", "version": {"number": self.version}}
        if path.startswith("/_data_stream/"):
            return 200, headers, {"data_streams": self.data_streams}
        if request.method == "PUT":
            self.stored[path] = json.loads(request.body)
            return 200, headers, {"acknowledged": True}
        if path in self.stored:
            return 200, headers, {"found": self.stored[path]}
        return 404, headers, {"error": {"type": "resource_not_found_exception"}, "status": 404}


@pytest.fixture
def es() -> Iterator[FakeElasticsearch]:
    server = FakeElasticsearch()
    yield server
    server.close()


def setup_cli(capsys, *argv: str, environ: dict[str, str] | None = None) -> tuple[int, str, str]:
    code = main(["setup", *argv], environ or {})
    out, err = capsys.readouterr()
    return code, out, err


EXPECTED_PATHS = [
    ("GET", "/"),
    ("GET", "/_ilm/policy/celery-logs"),
    ("PUT", "/_ilm/policy/celery-logs"),
    ("GET", "/_component_template/logs-celery@mappings"),
    ("PUT", "/_component_template/logs-celery@mappings"),
    ("GET", "/_index_template/logs-celery"),
    ("PUT", "/_index_template/logs-celery"),
    ("GET", "/_data_stream/logs-celery-*"),
]


def test_setup_elasticsearch_installs_the_three_objects(es, capsys) -> None:
    code, out, err = setup_cli(
        capsys, "elasticsearch", "--url", es.url, "--api-key", "S2V5", "--delete-after", "45d"
    )
    assert (code, err) == (0, "")
    assert [(r.method, urllib.parse.unquote(r.path)) for r in es.requests] == EXPECTED_PATHS
    for request in es.requests:
        assert request.headers["authorization"] == "ApiKey S2V5"
        assert request.headers["accept"] == COMPAT_ACCEPT
    assert es.stored["/_ilm/policy/celery-logs"] == ASSETS.ilm_policy("45d")
    assert es.stored["/_component_template/logs-celery@mappings"] == COMPONENT
    assert es.stored["/_index_template/logs-celery"] == ASSETS.index_template()
    assert "Elasticsearch 8.13.4 at " + es.url in out
    assert re.search(r"ILM policy\s+celery-logs\s+created\s+delete after 45d", out)
    assert re.search(r"component template\s+logs-celery@mappings\s+created", out)
    assert re.search(r"index template\s+logs-celery\s+created\s+logs-celery-\*, priority 200", out)


def test_setup_elasticsearch_twice_updates_in_place(es, capsys) -> None:
    assert setup_cli(capsys, "elasticsearch", "--url", es.url)[0] == 0
    first = dict(es.stored)
    es.requests.clear()
    code, out, _ = setup_cli(capsys, "elasticsearch", "--url", es.url)
    assert code == 0
    assert [(r.method, urllib.parse.unquote(r.path)) for r in es.requests] == EXPECTED_PATHS
    assert es.stored == first
    assert out.count(" updated ") == 3 and " created " not in out


def test_setup_elasticsearch_from_the_environment(es, capsys) -> None:
    environ = {
        "ELASTICSEARCH_HOSTS": f"{es.url} http://127.0.0.1:1",
        "ELASTICSEARCH_USERNAME": "elastic",
        "ELASTICSEARCH_PASSWORD": "s3cret",
    }
    code, _, err = setup_cli(capsys, "elasticsearch", environ=environ)
    assert (code, err) == (0, "")
    token = base64.b64encode(b"elastic:s3cret").decode()
    assert {r.headers["authorization"] for r in es.requests} == {f"Basic {token}"}


def test_setup_elasticsearch_hints_at_data_streams_made_before_the_template(es, capsys) -> None:
    es.data_streams = [
        {"name": "logs-celery-default", "template": "logs"},
        {"name": "logs-celery-prod", "template": "logs-celery"},
    ]
    code, out, _ = setup_cli(capsys, "elasticsearch", "--url", es.url)
    assert code == 0
    assert "data stream logs-celery-default was created before this template" in out
    assert "POST logs-celery-default/_rollover" in out
    assert "logs-celery-prod" not in out


def test_setup_elasticsearch_waits_for_a_starting_cluster(capsys) -> None:
    server = FakeElasticsearch(unavailable=1)
    try:
        code, _, err = setup_cli(capsys, "elasticsearch", "--url", server.url, "--wait", "10")
        assert (code, err) == (0, "")
        assert len(server.stored) == 3
    finally:
        server.close()


@pytest.mark.parametrize(
    ("behaviour", "message"),
    [
        ({"reject_auth": True}, "refused the credentials (security_exception: unable to auth"),
        ({"product": None}, "is not Elasticsearch (no X-Elastic-Product header)"),
        ({"version": "8.5.3"}, "Elasticsearch 8.5.3 at http://127.0.0.1:"),
        ({"unavailable": 5}, "answered GET / with 503 master_not_discovered_exception"),
    ],
    ids=["bad-credentials", "not-elasticsearch", "too-old", "unavailable"],
)
def test_setup_elasticsearch_failures_are_clear(behaviour, message, capsys) -> None:
    server = FakeElasticsearch(**behaviour)
    try:
        code, _, err = setup_cli(
            capsys, "elasticsearch", "--url", server.url, "--user", "u", "--password", "p"
        )
        assert code == 1
        assert err.startswith("celery-obs setup elasticsearch: error: ")
        assert message in err
        assert server.stored == {}
    finally:
        server.close()


def test_setup_elasticsearch_unreachable(capsys) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = setup_cli(capsys, "elasticsearch", "--url", url)
    assert code == 1 and out == ""
    assert f"error: cannot reach Elasticsearch at {url}: " in err
    started = time.monotonic()
    code, _, err = setup_cli(capsys, "elasticsearch", "--url", url, "--wait", "1.5")
    assert code == 1
    assert 1.4 < time.monotonic() - started < 10
    assert f"cannot reach Elasticsearch at {url} after waiting 1.5s" in err


def test_setup_usage_errors(capsys, tmp_path) -> None:
    code, _, err = setup_cli(capsys, "elasticsearch")
    assert (code, err.strip()) == (
        2,
        "celery-obs setup elasticsearch: error: --url (or ELASTICSEARCH_URL) is required",
    )
    with pytest.raises(SystemExit) as exit_:
        main(["setup", "elasticsearch", "--url", "http://x", "--delete-after", "30 days"], {})
    assert exit_.value.code == 2
    assert "whole number and a unit" in capsys.readouterr().err
    code, _, err = setup_cli(
        capsys, "elasticsearch", "--url", "http://x", "--assets", str(tmp_path)
    )
    assert code == 2 and "expected the directories elasticsearch/ and kibana/" in err
    with pytest.raises(SystemExit):
        main(["setup", "elasticsearch", "--api-key", "k", "--user", "u"], {})
    code, _, err = setup_cli(capsys, "elasticsearch", "--url", "http://127.0.0.1:1", "--user", "u")
    assert code == 2 and "--user needs --password" in err  # caught before any request


def test_setup_uses_assets_from_the_environment(es, capsys, tmp_path) -> None:
    for directory in ("elasticsearch", "kibana"):
        shutil.copytree(ROOT / directory, tmp_path / directory)
    policy = json.loads((tmp_path / "elasticsearch/ilm-policy.json").read_text())
    policy["policy"]["_meta"]["description"] = "from the environment's copy"
    (tmp_path / "elasticsearch/ilm-policy.json").write_text(json.dumps(policy))
    environ = {"ELASTICSEARCH_URL": es.url, "CELERY_OBS_ASSETS": str(tmp_path)}
    assert setup_cli(capsys, "elasticsearch", environ=environ)[0] == 0
    stored = es.stored["/_ilm/policy/celery-logs"]["policy"]
    assert stored["_meta"]["description"] == "from the environment's copy"


class FakeKibana(FakeServer):
    def __init__(self, unavailable: int = 0, fail: bool = False) -> None:
        self.unavailable = unavailable
        self.fail = fail
        self.uploads: list[SimpleNamespace] = []
        super().__init__()

    def respond(self, request: SimpleNamespace) -> tuple[int, dict[str, str], Any]:
        if self.unavailable:
            self.unavailable -= 1
            return 503, {}, {"statusCode": 503, "message": "Kibana server is not ready yet"}
        if request.path.endswith("/api/status"):
            return 200, {}, {"status": {"overall": {"level": "available"}}}
        if "/api/saved_objects/_import" not in request.path:
            return 404, {}, {"statusCode": 404}
        message = BytesParser(policy=email_policy).parsebytes(
            f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode() + request.body
        )
        (part,) = message.iter_parts()
        upload = SimpleNamespace(
            field=part.get_param("name", header="content-disposition"),
            filename=part.get_filename(),
            content=part.get_payload(decode=True),
        )
        self.uploads.append(upload)
        objects = [json.loads(line) for line in upload.content.splitlines()]
        if self.fail:
            error = {"type": "missing_references", "references": [{"type": "x", "id": "y"}]}
            return (
                200,
                {},
                {
                    "success": False,
                    "successCount": len(objects) - 1,
                    "errors": [
                        {"type": "lens", "id": "z", "meta": {"title": "Chart"}, "error": error}
                    ],
                },
            )
        results = [{"type": o["type"], "id": o["id"]} for o in objects]
        return 200, {}, {"success": True, "successCount": len(objects), "successResults": results}


def test_setup_kibana_imports_the_ndjson(capsys) -> None:
    kibana = FakeKibana()
    environ = {
        "KIBANA_URL": kibana.url,
        "ELASTICSEARCH_USERNAME": "elastic",
        "ELASTICSEARCH_PASSWORD": "pw",
    }
    try:
        code, out, err = setup_cli(capsys, "kibana", environ=environ)
        assert (code, err) == (0, "")
        (request,) = kibana.requests
        assert (request.method, request.path) == (
            "POST",
            "/api/saved_objects/_import?overwrite=true",
        )
        assert request.headers["kbn-xsrf"]
        assert (
            request.headers["authorization"] == "Basic " + base64.b64encode(b"elastic:pw").decode()
        )
        assert request.headers["content-type"].startswith("multipart/form-data; boundary=")
        (upload,) = kibana.uploads
        assert (upload.field, upload.filename) == ("file", "celery.ndjson")
        assert upload.content == (ROOT / "kibana/celery.ndjson").read_bytes()
        total = len(upload.content.splitlines())
        assert f"imported {total} objects (1 dashboard, 1 index-pattern, 4 lens, 5 search)" in out
        assert f"{kibana.url}/app/dashboards#/view/celery-logs-overview" in out
    finally:
        kibana.close()


def test_setup_kibana_space_wait_and_own_credentials(capsys) -> None:
    kibana = FakeKibana(unavailable=1)
    environ = {"KIBANA_USERNAME": "kb", "KIBANA_PASSWORD": "x", "ELASTICSEARCH_USERNAME": "es"}
    try:
        code, out, err = setup_cli(
            capsys, "kibana", "--url", kibana.url, "--space", "ops", "--wait", "10", environ=environ
        )
        assert (code, err) == (0, "")
        paths = [r.path for r in kibana.requests]
        assert paths == [
            "/s/ops/api/status",
            "/s/ops/api/status",
            "/s/ops/api/saved_objects/_import?overwrite=true",
        ]
        assert kibana.requests[-1].headers["authorization"] == (
            "Basic " + base64.b64encode(b"kb:x").decode()
        )
        assert "into space ops" in out
    finally:
        kibana.close()


def test_setup_kibana_reports_import_errors(capsys) -> None:
    kibana = FakeKibana(fail=True)
    try:
        code, _, err = setup_cli(capsys, "kibana", "--url", kibana.url, "--api-key", "k")
        assert code == 1
        assert "error: lens z (Chart): missing references: x y" in err
        assert "1 object(s) could not be imported" in err
        assert kibana.requests[0].headers["authorization"] == "ApiKey k"
    finally:
        kibana.close()


def test_setup_kibana_unreachable(capsys) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, _, err = setup_cli(capsys, "kibana", "--url", url)
    assert code == 1 and f"error: cannot reach Kibana at {url}: " in err


# -- the Kibana saved objects ----------------------------------------------------------------


def kibana_lines() -> list[dict[str, Any]]:
    text = (ROOT / "kibana/celery.ndjson").read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_kibana_ndjson_is_up_to_date() -> None:
    committed = (ROOT / "kibana/celery.ndjson").read_text(encoding="utf-8")
    assert committed == kibana_objects.render(), (
        "kibana/celery.ndjson is stale: run python -m stack_setup.kibana_objects"
    )


def test_kibana_objects_are_complete_and_every_reference_resolves() -> None:
    objects = kibana_lines()
    ids = {(o["type"], o["id"]) for o in objects}
    assert len(ids) == len(objects)
    required = {
        "index-pattern": {"title", "timeFieldName"},
        "search": {"title", "columns", "sort", "kibanaSavedObjectMeta"},
        "lens": {"title", "visualizationType", "state"},
        "dashboard": {"title", "panelsJSON", "kibanaSavedObjectMeta"},
    }
    for obj in objects:
        assert set(obj) >= {"type", "id", "attributes", "references"}
        assert obj["typeMigrationVersion"] and obj["coreMigrationVersion"]
        assert required[obj["type"]] <= set(obj["attributes"]), obj["id"]
        for ref in obj["references"]:
            assert (ref["type"], ref["id"]) in ids, (obj["id"], ref)
    (view,) = [o for o in objects if o["type"] == "index-pattern"]
    assert view["id"] == names.DATA_VIEW_ID
    assert view["attributes"]["title"] == names.INDEX_PATTERN
    assert view["attributes"]["timeFieldName"] == "@timestamp"
    json.loads(view["attributes"]["fieldFormatMap"])


def test_saved_searches_point_at_the_data_view() -> None:
    searches = {o["id"]: o for o in kibana_lines() if o["type"] == "search"}
    assert {"celery-failures", "celery-retries", "celery-slow-tasks", "celery-task-story"} <= set(
        searches
    )
    for search in searches.values():
        source = json.loads(search["attributes"]["kibanaSavedObjectMeta"]["searchSourceJSON"])
        assert source["query"]["language"] == "kuery"
        (ref,) = search["references"]
        assert ref == {
            "type": "index-pattern",
            "id": names.DATA_VIEW_ID,
            "name": source["indexRefName"],
        }
    query = lambda i: json.loads(  # noqa: E731
        searches[i]["attributes"]["kibanaSavedObjectMeta"]["searchSourceJSON"]
    )["query"]["query"]
    assert query("celery-retries") == 'event.action : "task-retried"'
    assert query("celery-slow-tasks") == "celery.task.runtime > 5"
    assert searches["celery-slow-tasks"]["attributes"]["sort"] == [["celery.task.runtime", "desc"]]
    assert "log.level" in query("celery-failures") and "failure" in query("celery-failures")
    assert searches["celery-task-story"]["attributes"]["sort"] == [["@timestamp", "asc"]]


def test_dashboard_panels_reference_their_objects() -> None:
    objects = kibana_lines()
    (board,) = [o for o in objects if o["type"] == "dashboard"]
    panels = json.loads(board["attributes"]["panelsJSON"])
    json.loads(board["attributes"]["kibanaSavedObjectMeta"]["searchSourceJSON"])
    refs = {r["name"]: r for r in board["references"]}
    assert len(panels) == len(refs) == 6
    for panel in panels:
        ref = refs[f"{panel['panelIndex']}:{panel['panelRefName']}"]
        assert ref["type"] == panel["type"]
        grid = panel["gridData"]
        assert grid["i"] == panel["panelIndex"] and grid["x"] + grid["w"] <= 48
    kinds = {o["id"]: o["attributes"].get("visualizationType") for o in objects}
    assert {kinds[r["id"]] for r in refs.values()} == {"lnsXY", "lnsDatatable", None}
    for lens in (o for o in objects if o["type"] == "lens"):
        layers = lens["attributes"]["state"]["datasourceStates"]["formBased"]["layers"]
        assert {r["name"] for r in lens["references"]} == {
            f"indexpattern-datasource-layer-{layer}" for layer in layers
        }
        for layer in layers.values():
            order, columns = layer["columnOrder"], layer["columns"]
            assert sorted(order) == sorted(columns)
            bucketed = [columns[c]["isBucketed"] for c in order]
            assert bucketed == sorted(bucketed, reverse=True)  # buckets first, then metrics


def _kql_fields(query: str) -> set[str]:
    return set(re.findall(r"([A-Za-z_@][\w.@]*)\s*(?::|>|<)", query))


def test_every_field_the_kibana_objects_use_is_mapped() -> None:
    used: set[str] = set()
    for obj in kibana_lines():
        attributes = obj["attributes"]
        if obj["type"] == "search":
            used |= set(attributes["columns"]) | {field for field, _ in attributes["sort"]}
            source = json.loads(attributes["kibanaSavedObjectMeta"]["searchSourceJSON"])
            used |= _kql_fields(source["query"]["query"])
        if obj["type"] == "lens":
            state = attributes["state"]
            used |= _kql_fields(state["query"]["query"])
            for layer in state["datasourceStates"]["formBased"]["layers"].values():
                used |= {c["sourceField"] for c in layer["columns"].values()}
    used.discard("___records___")
    assert {"celery.task.runtime", "error.type", "host.hostname", "event.action"} <= used
    unmapped = sorted(
        f for f in used if f not in BUILTIN and mapping_at(tuple(f.split("."))) is None
    )
    assert unmapped == []


def test_grafana_kibana_links_use_mapped_fields_and_our_data_view() -> None:
    pytest.importorskip("grafanalib")
    from dashboards.panels import kibana_link

    url = kibana_link()["url"]
    assert "/app/discover#/" in url and "language:kuery" in url
    query = re.search(r"query:'([^']*)'", url)
    assert query is not None
    fields = _kql_fields(query.group(1))
    assert fields == {"celery.task.name"}
    for field in fields:
        assert (mapping_at(tuple(field.split("."))) or {}).get("type") == "keyword"
    index = re.search(r"index:'?([\w-]+)", url)
    assert index is not None  # else Discover opens the user's default data view
    assert index.group(1) == names.DATA_VIEW_ID


# -- live: a real Elasticsearch / Kibana, when given -----------------------------------------


def _live_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(("ELASTICSEARCH_", "KIBANA_"))}


@pytest.mark.skipif(not os.environ.get("ELASTICSEARCH_URL"), reason="ELASTICSEARCH_URL not set")
def test_live_elasticsearch_setup_and_a_real_record(records, capsys) -> None:
    from stack_setup.elasticsearch import HEADERS, Connection, make_client

    environ = _live_environ()
    assert setup_cli(capsys, "elasticsearch", environ=environ)[0] == 0
    code, out, _ = setup_cli(capsys, "elasticsearch", environ=environ)
    assert code == 0 and out.count(" updated ") == 3
    client = make_client(
        Connection(
            url=environ["ELASTICSEARCH_URL"],
            api_key=environ.get("ELASTICSEARCH_API_KEY"),
            username=environ.get("ELASTICSEARCH_USERNAME"),
            password=environ.get("ELASTICSEARCH_PASSWORD"),
            ca_certs=environ.get("ELASTICSEARCH_CA_CERTS"),
        )
    )
    stream = "logs-celery-setuptest"

    def call(method: str, path: str, body: Any = None) -> Any:
        return client.perform_request(method, path, headers=HEADERS, body=body).body

    try:
        for record in records:
            answer = call("POST", f"/{stream}/_doc?refresh=true", record)
            assert answer["result"] == "created"
        (info,) = call("GET", f"/_data_stream/{stream}")["data_streams"]
        assert info["template"] == names.INDEX_TEMPLATE
        assert info.get("ilm_policy") == names.ILM_POLICY
        ignored = call(
            "POST", f"/{stream}/_search", {"query": {"exists": {"field": "_ignored"}}, "size": 5}
        )
        assert ignored["hits"]["total"]["value"] == 0, ignored["hits"]["hits"]
        fields = call("GET", f"/{stream}/_mapping/field/celery.*,event.*,labels.*,service.name")
        types: dict[str, str] = {}
        for index in fields.values():
            for name, spec in index["mappings"].items():
                (leaf,) = spec["mapping"].values()
                types[name] = leaf.get("type", "object")
        assert types["celery.task.id"] == types["celery.task.name"] == "keyword"
        assert types["celery.task.runtime"] == "float"
        assert types["celery.task.retries"] == types["event.duration"] == "long"
        assert types["celery.task.eta"] == "date"
        assert types["celery.task.kwargs"] == "flattened"
        assert types["labels.log_records_dropped"] == "long"
        assert types["labels.a"] == "keyword"
        assert types["service.name"] == types["event.action"] == "keyword"
    finally:
        # ignore_status: a missing stream must not hide the real failure
        client.options(ignore_status=404).perform_request(
            "DELETE", f"/_data_stream/{stream}", headers=HEADERS
        )


@pytest.mark.skipif(not os.environ.get("KIBANA_URL"), reason="KIBANA_URL not set")
def test_live_kibana_import_twice(capsys) -> None:
    from stack_setup.kibana import KibanaClient, KibanaConnection

    environ = _live_environ()
    for _ in range(2):
        code, _, err = setup_cli(capsys, "kibana", environ=environ)
        assert code == 0, err
    user = environ.get("KIBANA_USERNAME") or environ.get("ELASTICSEARCH_USERNAME")
    password = environ.get("KIBANA_PASSWORD") or environ.get("ELASTICSEARCH_PASSWORD")
    client = KibanaClient(
        KibanaConnection(
            url=environ["KIBANA_URL"],
            username=user,
            password=password,
            ca_certs=environ.get("KIBANA_CA_CERTS") or environ.get("ELASTICSEARCH_CA_CERTS"),
            space=environ.get("KIBANA_SPACE"),
        )
    )
    for kind, object_id in [
        ("index-pattern", names.DATA_VIEW_ID),
        ("dashboard", kibana_objects.DASHBOARD_ID),
        ("search", "celery-task-story"),
    ]:
        found = client.request("GET", f"/api/saved_objects/{kind}/{object_id}")
        assert found["id"] == object_id and "error" not in found


if __name__ == "__main__":  # pragma: no cover - a handy way to look at the records
    json.dump(_lifecycle_records(), sys.stdout, indent=2)
