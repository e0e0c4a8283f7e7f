"""The Kibana saved objects (kibana/celery.ndjson) and the Grafana links into Kibana."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from celery_obs.setup import assets as names
from celery_obs.setup import kibana_objects

from es_mapping_model import BUILTIN, ROOT, mapping_at


def kibana_lines() -> list[dict[str, Any]]:
    text = (ROOT / "kibana/celery.ndjson").read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_kibana_ndjson_is_up_to_date() -> None:
    committed = (ROOT / "kibana/celery.ndjson").read_text(encoding="utf-8")
    assert committed == kibana_objects.render(), (
        "kibana/celery.ndjson is stale: run python -m celery_obs.setup.kibana_objects"
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
        assert obj["typeMigrationVersion"]
        assert obj["coreMigrationVersion"]
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
    assert "log.level" in query("celery-failures")
    assert "failure" in query("celery-failures")
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
        assert grid["i"] == panel["panelIndex"]
        assert grid["x"] + grid["w"] <= 48
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
    from celery_obs.dashboards.panels import kibana_link

    url = kibana_link()["url"]
    assert "/app/discover#/" in url
    assert "language:kuery" in url
    query = re.search(r"query:'([^']*)'", url)
    assert query is not None
    fields = _kql_fields(query.group(1))
    assert fields == {"celery.task.name"}
    for field in fields:
        assert (mapping_at(tuple(field.split("."))) or {}).get("type") == "keyword"
    index = re.search(r"index:'?([\w-]+)", url)
    assert index is not None  # else Discover opens the user's default data view
    assert index.group(1) == names.DATA_VIEW_ID
