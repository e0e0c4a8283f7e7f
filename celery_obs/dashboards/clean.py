"""Turn grafanalib's output into the JSON Grafana's own schema describes.

grafanalib writes every field it knows, set or not: `null` for unset ones (Grafana's official
models, grafana-foundation-sdk, cannot even parse a `null` datasource), keys Grafana dropped
years ago (`style`, `hideControls`, panel `span`/`height`/`error`), and defaults that degrade
the panels: `maxDataPoints: 100` and `intervalFactor: 2` give about 50 points a panel, a 72 s
step at 1 h. Removed here, Grafana uses its own resolution (one point per pixel column,
`$__rate_interval`). tests/dashboards checks the result round-trips through Grafana's models.
"""

from __future__ import annotations

from typing import Any

#: Keys Grafana's dashboard schema no longer has, by where they appear.
_DASHBOARD = {"__inputs", "hideControls", "sharedCrosshair", "style", "rows", "gnetId", "id"}
_PANEL = {
    "editable",
    "error",
    "span",
    "height",
    "minSpan",
    "hideTimeOverride",
    "transparent",
    "cacheTimeout",
    # Grafana's defaults: as many points as the panel is wide, not grafanalib's 100.
    "maxDataPoints",
    # Tables: pre-7 columns and styling; field config and options replaced them.
    "columns",
    "fontSize",
    "styles",
    "scroll",
    "sort",
}
_TARGET = {"metric", "query", "step", "target", "intervalFactor", "hide"}
_VARIABLE = {
    "useTags",
    "tagsQuery",
    "tagValuesQuery",
    "tags",
    # Only interval variables have an "auto" option.
    "auto",
    "auto_count",
    "auto_min",
}
_TIMEPICKER = {"nowDelay", "time_options"}


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _drop(mapping: dict, keys: set[str]) -> None:
    for key in keys & mapping.keys():
        del mapping[key]


def _panel(panel: dict) -> None:
    _drop(panel, _PANEL)
    for key in ("links", "transformations", "targets"):
        if panel.get(key) == []:
            del panel[key]
    if panel.get("interval") == "":
        del panel["interval"]
    for target in panel.get("targets", []):
        _drop(target, _TARGET)
        if target.get("interval") == "":
            del target["interval"]
    if panel["type"] == "table":
        # grafanalib's table keeps these beside fieldConfig, where Grafana no longer reads them.
        defaults = panel.setdefault("fieldConfig", {}).setdefault("defaults", {})
        for key in ("color", "mappings"):
            if panel.get(key):
                defaults.setdefault(key, panel[key])
            panel.pop(key, None)
    if panel["type"] == "row":
        # A row holds no query: grafanalib gives it a panel's field config and targets.
        for key in ("fieldConfig", "options", "datasource", "description"):
            panel.pop(key, None)
    for child in panel.get("panels", []):
        _panel(child)


def _variable(variable: dict) -> None:
    _drop(variable, _VARIABLE)
    current = variable.get("current")
    if current:
        current.pop("tags", None)
        if current.get("value") == "$__all":
            current["text"] = "All"  # what Grafana itself stores for "All"


def clean(dashboard: dict) -> dict:
    """A copy of grafanalib's `to_json_data()` output, as Grafana's schema describes it."""
    data: dict = _without_nulls(dashboard)
    _drop(data, _DASHBOARD)
    _drop(data.get("timepicker", {}), _TIMEPICKER)
    for panel in data.get("panels", []):
        _panel(panel)
    for variable in data.get("templating", {}).get("list", []):
        _variable(variable)
    return data
