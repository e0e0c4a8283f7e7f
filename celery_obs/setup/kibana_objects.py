"""The Kibana saved objects for Celery logs, as code; `kibana/celery.ndjson` is written from here.

A data view on logs-celery-*, four saved searches (failures, retries, slow tasks, one task's
story), four Lens charts and a dashboard that shows them. Objects have fixed ids so that
re-importing overwrites them and links (Grafana's "logs of this task") stay valid. The lines
are written deterministically; a test regenerates them and fails when the file is stale:

    python -m celery_obs.setup.kibana_objects kibana/celery.ndjson

Versions: `typeMigrationVersion` says which saved object format each object is in; these are
the formats Kibana 8.11 exports. Newer Kibanas (8.x, 9.x) migrate them on import; Kibana 8.11
is the oldest we target.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .assets import DATA_VIEW_ID, INDEX_PATTERN

CORE_MIGRATION_VERSION = "8.8.0"
TYPE_MIGRATION_VERSIONS = {
    "index-pattern": "8.0.0",
    "search": "8.0.0",
    "lens": "8.9.0",
    "dashboard": "8.9.0",
}
PANEL_VERSION = "8.11.0"
DASHBOARD_ID = "celery-logs-overview"
SEARCH_INDEX_REF = "kibanaSavedObjectMeta.searchSourceJSON.index"
#: Actions log_shipping.lifecycle writes when a task fails (the retry action is separate).
FAILED_ACTIONS = ("task-failed", "task-unknown", "task-internal-error")
SLOW_SECONDS = 5  # the demo's reports take 2-9 s: some are slow


def _json(value: Any) -> str:
    """Saved objects store some attributes as JSON strings; keep them stable across runs."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _object(
    kind: str, object_id: str, attributes: dict[str, Any], references: list[dict[str, str]]
) -> dict[str, Any]:
    return {
        "type": kind,
        "id": object_id,
        "attributes": attributes,
        "references": references,
        "coreMigrationVersion": CORE_MIGRATION_VERSION,
        "typeMigrationVersion": TYPE_MIGRATION_VERSIONS[kind],
    }


def _data_view_ref(name: str) -> dict[str, str]:
    return {"type": "index-pattern", "id": DATA_VIEW_ID, "name": name}


def data_view() -> dict[str, Any]:
    durations = {
        # event.duration is in nanoseconds (ECS), celery.task.runtime in seconds.
        "event.duration": {
            "id": "duration",
            "params": {"inputFormat": "nanoseconds", "outputFormat": "humanizePrecise"},
        },
        "celery.task.runtime": {
            "id": "duration",
            "params": {"inputFormat": "seconds", "outputFormat": "humanizePrecise"},
        },
    }
    return _object(
        "index-pattern",
        DATA_VIEW_ID,
        {
            "title": INDEX_PATTERN,
            "name": "Celery logs",
            "timeFieldName": "@timestamp",
            "fieldFormatMap": _json(durations),
        },
        [],
    )


def saved_search(
    object_id: str,
    title: str,
    description: str,
    query: str,
    columns: list[str],
    sort: list[list[str]],
) -> dict[str, Any]:
    source = {
        "query": {"query": query, "language": "kuery"},
        "filter": [],
        "indexRefName": SEARCH_INDEX_REF,
    }
    return _object(
        "search",
        object_id,
        {
            "title": title,
            "description": description,
            "columns": columns,
            "sort": sort,
            "grid": {},
            "hideChart": False,
            "isTextBasedQuery": False,
            "kibanaSavedObjectMeta": {"searchSourceJSON": _json(source)},
        },
        [_data_view_ref(SEARCH_INDEX_REF)],
    )


def searches() -> list[dict[str, Any]]:
    failed = " or ".join(f'"{action}"' for action in FAILED_ACTIONS)
    return [
        saved_search(
            "celery-failures",
            "Celery: failures",
            "Failed, unknown, revoked and rejected tasks, retries, and every error line.",
            'event.outcome : "failure" or log.level : "error"',
            ["celery.task.name", "event.action", "error.type", "error.message", "host.hostname"],
            [["@timestamp", "desc"]],
        ),
        saved_search(
            "celery-retries",
            "Celery: retries",
            "Task attempts that ended in a retry, with the retry count so far.",
            'event.action : "task-retried"',
            ["celery.task.name", "celery.task.id", "celery.task.retries", "message"],
            [["@timestamp", "desc"]],
        ),
        saved_search(
            "celery-slow-tasks",
            f"Celery: tasks slower than {SLOW_SECONDS}s",
            "Finished task runs by runtime, slowest first. Change the threshold in the query.",
            f"celery.task.runtime > {SLOW_SECONDS}",
            ["celery.task.name", "celery.task.runtime", "event.action", "celery.task.id"],
            [["celery.task.runtime", "desc"]],
        ),
        saved_search(
            "celery-task-story",
            "Celery: one task's story",
            "Every line about one task, oldest first: put its id in the query "
            '(celery.task.id : "<id>"), or celery.task.root_id : "<id>" for a whole workflow. '
            "Grafana's task links open Discover with such a query.",
            "celery.task.id : *",
            ["event.action", "message", "celery.task.retries", "host.hostname", "process.name"],
            [["@timestamp", "asc"]],
        ),
        saved_search(
            "celery-failed-tasks",
            "Celery: failed tasks",
            "Task runs that failed (task-failed, task-unknown, task-internal-error); the "
            "dashboard's list.",
            f"event.action : ({failed})",
            ["celery.task.name", "error.type", "error.message", "celery.task.id"],
            [["@timestamp", "desc"]],
        ),
    ]


# -- Lens ------------------------------------------------------------------------------------

LAYER = "layer1"


def _date_histogram() -> dict[str, Any]:
    return {
        "label": "@timestamp",
        "dataType": "date",
        "operationType": "date_histogram",
        "sourceField": "@timestamp",
        "isBucketed": True,
        "scale": "interval",
        "params": {"interval": "auto", "includeEmptyRows": True, "dropPartials": False},
    }


def _terms(field: str, label: str, size: int, order_by: str) -> dict[str, Any]:
    return {
        "label": label,
        "customLabel": True,
        "dataType": "string",
        "operationType": "terms",
        "sourceField": field,
        "isBucketed": True,
        "scale": "ordinal",
        "params": {
            "size": size,
            "orderBy": {"type": "column", "columnId": order_by},
            "orderDirection": "desc",
            "otherBucket": True,
            "missingBucket": False,
            "parentFormat": {"id": "terms"},
        },
    }


def _count(label: str) -> dict[str, Any]:
    return {
        "label": label,
        "customLabel": True,
        "dataType": "number",
        "operationType": "count",
        "sourceField": "___records___",
        "isBucketed": False,
        "scale": "ratio",
        "params": {"emptyAsNull": True},
    }


def _metric(operation: str, field: str, label: str, **params: Any) -> dict[str, Any]:
    return {
        "label": label,
        "customLabel": True,
        "dataType": "number",
        "operationType": operation,
        "sourceField": field,
        "isBucketed": False,
        "scale": "ratio",
        "params": params or {"emptyAsNull": True},
    }


def lens(
    object_id: str,
    title: str,
    description: str,
    visualization_type: str,
    query: str,
    columns: dict[str, dict[str, Any]],
    visualization: dict[str, Any],
) -> dict[str, Any]:
    layer = {
        "columns": columns,
        "columnOrder": list(columns),
        "incompleteColumns": {},
        "sampling": 1,
    }
    state = {
        "datasourceStates": {"formBased": {"layers": {LAYER: layer}}},
        "visualization": visualization,
        "query": {"query": query, "language": "kuery"},
        "filters": [],
        "internalReferences": [],
        "adHocDataViews": {},
    }
    return _object(
        "lens",
        object_id,
        {
            "title": title,
            "description": description,
            "visualizationType": visualization_type,
            "state": state,
        },
        [_data_view_ref(f"indexpattern-datasource-layer-{LAYER}")],
    )


def _xy(series: str, x: str, accessors: list[str], split: str | None = None) -> dict[str, Any]:
    layer: dict[str, Any] = {
        "layerId": LAYER,
        "layerType": "data",
        "seriesType": series,
        "xAccessor": x,
        "accessors": accessors,
    }
    if split:
        layer["splitAccessor"] = split
    return {
        "legend": {"isVisible": True, "position": "right"},
        "valueLabels": "hide",
        "preferredSeriesType": series,
        "layers": [layer],
    }


def charts() -> list[dict[str, Any]]:
    failed = " or ".join(f'"{action}"' for action in FAILED_ACTIONS)
    return [
        lens(
            "celery-failures-over-time",
            "Task failures over time",
            "Failed task runs per interval, by task name (top 10).",
            "lnsXY",
            f"event.action : ({failed})",
            {
                "task": _terms("celery.task.name", "Task", 10, "failures"),
                "time": _date_histogram(),
                "failures": _count("Failures"),
            },
            _xy("bar_stacked", "time", ["failures"], split="task"),
        ),
        lens(
            "celery-top-exceptions",
            "Top exceptions",
            "Exception classes of failed tasks and error lines.",
            "lnsXY",
            "error.type : *",
            {
                "exception": _terms("error.type", "Exception", 10, "count"),
                "count": _count("Records"),
            },
            _xy("bar_horizontal", "exception", ["count"]),
        ),
        lens(
            "celery-slowest-tasks",
            "Slowest tasks",
            "Per task name: longest and 95th percentile runtime, and number of finished runs.",
            "lnsDatatable",
            "celery.task.runtime : *",
            {
                "task": _terms("celery.task.name", "Task", 20, "max"),
                "max": _metric("max", "celery.task.runtime", "Longest run"),
                "p95": _metric("percentile", "celery.task.runtime", "p95 runtime", percentile=95),
                "runs": _count("Runs"),
            },
            {
                "layerId": LAYER,
                "layerType": "data",
                "columns": [{"columnId": c} for c in ("task", "max", "p95", "runs")],
            },
        ),
        lens(
            "celery-log-volume-by-worker",
            "Log volume by worker host",
            "Log records per interval, by host.hostname (every record has it).",
            "lnsXY",
            "",
            {
                "host": _terms("host.hostname", "Host", 10, "records"),
                "time": _date_histogram(),
                "records": _count("Records"),
            },
            _xy("bar_stacked", "time", ["records"], split="host"),
        ),
    ]


# -- Dashboard -------------------------------------------------------------------------------

#: (object id, type, x, y, w, h) on Kibana's 48-column grid.
LAYOUT = [
    ("celery-failures-over-time", "lens", 0, 0, 24, 15),
    ("celery-top-exceptions", "lens", 24, 0, 24, 15),
    ("celery-slowest-tasks", "lens", 0, 15, 24, 15),
    ("celery-log-volume-by-worker", "lens", 24, 15, 24, 15),
    ("celery-failed-tasks", "search", 0, 30, 48, 15),
    ("celery-slow-tasks", "search", 0, 45, 48, 15),
]


def dashboard() -> dict[str, Any]:
    panels, references = [], []
    for number, (object_id, kind, x, y, w, h) in enumerate(LAYOUT, start=1):
        index = f"p{number}"
        panels.append(
            {
                "version": PANEL_VERSION,
                "type": kind,
                "panelIndex": index,
                "gridData": {"x": x, "y": y, "w": w, "h": h, "i": index},
                "embeddableConfig": {"enhancements": {}},
                "panelRefName": f"panel_{index}",
            }
        )
        references.append({"type": kind, "id": object_id, "name": f"{index}:panel_{index}"})
    source = {"query": {"query": "", "language": "kuery"}, "filter": []}
    return _object(
        "dashboard",
        DASHBOARD_ID,
        {
            "title": "Celery logs",
            "description": "Failures, exceptions, slow tasks and log volume from the workers' "
            "JSON logs (celery-observability). Metrics are in Grafana's Celery dashboards.",
            "panelsJSON": _json(panels),
            "optionsJSON": _json(
                {"useMargins": True, "syncColors": False, "hidePanelTitles": False}
            ),
            "timeRestore": False,
            "kibanaSavedObjectMeta": {"searchSourceJSON": _json(source)},
        },
        references,
    )


def all_objects() -> list[dict[str, Any]]:
    return [data_view(), *searches(), *charts(), dashboard()]


def render() -> str:
    return "".join(_json(obj) + "\n" for obj in all_objects())


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    target = Path(args[0]) if args else Path(__file__).resolve().parents[1] / "kibana/celery.ndjson"
    target.write_text(render(), encoding="utf-8")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
