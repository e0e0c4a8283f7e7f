"""The Elasticsearch templates: their mappings checked against real records, and the files.

Elasticsearch cannot run here: the mappings are checked against real records that log_shipping
writes (every leaf must land on a mapping of a compatible type), using the small model of how
Elasticsearch maps a document in es_mapping_model.
"""

from __future__ import annotations

import fnmatch

import pytest

from celery_obs.log_shipping.redact import Redactor
from celery_obs.setup import assets as names
from celery_obs.setup.assets import find_assets

from es_mapping_model import ASSETS, ROOT, check_document, dynamic_mapping, mapping_at


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
        "trace.id",
        "span.id",
        "transaction.id",
        "celery.task.group_id",
        "celery.task.chord_callback_id",
        "celery.worker.concurrency.processes",
    } <= seen
    actions = {r.get("event", {}).get("action") for r in records}
    assert {
        "worker-started",
        "task-received",
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
        assert builtin in composed
        assert builtin in template["ignore_missing_component_templates"]
    assert names.COMPONENT_TEMPLATE not in template["ignore_missing_component_templates"]
    assert set(template["ignore_missing_component_templates"]) <= set(composed)
    settings = template["template"]["settings"]
    assert settings["index"]["lifecycle"]["name"] == names.ILM_POLICY


def test_ilm_policy_rolls_over_and_deletes_after_the_given_age() -> None:
    policy = ASSETS.ilm_policy("45d")["policy"]
    rollover = policy["phases"]["hot"]["actions"]["rollover"]
    assert rollover["max_age"] == "1d"
    assert rollover["max_primary_shard_size"] == "50gb"
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
    from celery_obs.log_shipping.hooks import LogConfig

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
