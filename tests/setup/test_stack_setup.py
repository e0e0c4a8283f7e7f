"""`celery-obs setup`, which installs the Elasticsearch templates and the Kibana objects.

Elasticsearch and Kibana cannot run here: the setup commands are checked against small fake
servers on 127.0.0.1, and the live tests run only when ELASTICSEARCH_URL / KIBANA_URL name real
ones. The templates and objects themselves are checked in test_es_mappings and
test_kibana_objects.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

from celery_obs.cli import main
from celery_obs.setup import assets as names
from celery_obs.setup import kibana_objects

from es_mapping_model import ASSETS, COMPONENT, ROOT
from fakes import FakeElasticsearch, FakeKibana
from support import free_port

COMPAT_ACCEPT = "application/vnd.elasticsearch+json; compatible-with=8"


# -- fake servers ----------------------------------------------------------------------------


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
    assert out.count(" updated ") == 3
    assert " created " not in out


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
    assert code == 1
    assert out == ""
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
    assert code == 2
    assert "expected the directories elasticsearch/ and kibana/" in err
    with pytest.raises(SystemExit):
        main(["setup", "elasticsearch", "--api-key", "k", "--user", "u"], {})
    code, _, err = setup_cli(capsys, "elasticsearch", "--url", "http://127.0.0.1:1", "--user", "u")
    assert code == 2
    assert "--user needs --password" in err


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
    assert code == 1
    assert f"error: cannot reach Kibana at {url}: " in err


# -- live: a real Elasticsearch / Kibana, when given -----------------------------------------


def _live_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(("ELASTICSEARCH_", "KIBANA_"))}


@pytest.mark.skipif(not os.environ.get("ELASTICSEARCH_URL"), reason="ELASTICSEARCH_URL not set")
def test_live_elasticsearch_setup_and_a_real_record(records, capsys) -> None:
    from celery_obs.setup.elasticsearch import HEADERS, Connection, make_client

    environ = _live_environ()
    assert setup_cli(capsys, "elasticsearch", environ=environ)[0] == 0
    code, out, _ = setup_cli(capsys, "elasticsearch", environ=environ)
    assert code == 0
    assert out.count(" updated ") == 3
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
    from celery_obs.setup.kibana import KibanaClient, KibanaConnection

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
        assert found["id"] == object_id
        assert "error" not in found
