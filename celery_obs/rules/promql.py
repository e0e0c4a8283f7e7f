"""What every generated rule file shares: checked inputs (durations, label selectors), PromQL
quoting, the replica labels that alerts aggregate away, and deterministic YAML output."""

from __future__ import annotations

import re
from dataclasses import dataclass

import yaml

#: A Prometheus duration: 26h, 90m, 1d12h, 30s: whole numbers, units largest first, each once.
_UNITS = {"y": 365 * 86400, "w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1, "ms": 0.001}
_DURATION = re.compile("".join(rf"(?:(?P<{u}>\d+){u})?" for u in _UNITS))
#: Longer is not a schedule anyone waits for (and Prometheus' durations end at 292 years).
_MAX_SECONDS = 10 * _UNITS["y"]
#: One label matcher: an ASCII label name, an operator, a string with Go's simple escapes.
_MATCHER = re.compile(
    r"\s*(?P<label>[A-Za-z_][A-Za-z0-9_]*)\s*(?P<op>=~|!~|!=|=)\s*"
    r'"(?P<value>(?:[^"\\\n]|\\["\\nt])*)"\s*(?:,|$)'
)
#: Labels the generated rules set or group by themselves.
_RESERVED_LABELS = frozenset({"__name__", "name"})

#: Labels that tell exporter replicas apart (Prometheus' `instance`; `pod` under the Prometheus
#: Operator). Several replicas watching one broker report the same numbers, so rules and
#: dashboards take the max over these before anything else: two replicas count once.
REPLICA_LABELS = ("instance", "pod")
DEDUP = f"max without ({', '.join(REPLICA_LABELS)})"

DEFAULT_SELECTOR = 'job="celery-exporter"'

#: Labels that tell watched clusters apart, kept by every aggregation: `job`, and `namespace`
#: and `cluster` where targets have them (under the Prometheus Operator two namespaces often
#: run a Service of the same name, hence the same job). A label a series lacks costs nothing.
#: Recording rules' names list what they keep besides `cluster` and `namespace`.
CLUSTER_LABELS = ("cluster", "namespace", "job")
CLUSTER_BY = ", ".join(CLUSTER_LABELS)


class RulesError(ValueError):
    """An input that cannot become a rule: the message says which and why."""


def parse_duration(text: str) -> float:
    match = _DURATION.fullmatch(text)
    if not text or match is None:
        raise RulesError(
            f"{text!r} is not a Prometheus duration (e.g. 26h, 90m, 1d12h: whole numbers, "
            "units from y, w, d, h, m, s, ms, largest first, each once)"
        )
    seconds = sum(int(n) * _UNITS[unit] for unit, n in match.groupdict().items() if n)
    if seconds <= 0:
        raise RulesError(f"{text!r} is not a positive duration")
    if seconds > _MAX_SECONDS:
        raise RulesError(f"{text!r} is longer than ten years")
    return seconds


def check_selector(selector: str) -> str:
    """`job="x", env=~"prod|stage"` (braces optional), checked matcher by matcher."""
    text = selector.strip()
    if text.startswith("{") and text.endswith("}"):
        text = text[1:-1]
    text = text.rstrip()
    matchers, position = [], 0
    while position < len(text):
        match = _MATCHER.match(text, position)
        if match is None:
            raise RulesError(
                f'{selector!r} is not a list of label matchers, e.g. job="celery-exporter" '
                f"(values in double quotes; stuck at {text[position : position + 20]!r})"
            )
        label, op, value = match.group("label", "op", "value")
        if "{{" in value or "}}" in value:
            # The selector is quoted in alert descriptions, which Prometheus expands as templates.
            raise RulesError(
                f"{selector!r}: a value with '{{{{' or '}}}}' cannot go into alert rules"
            )
        if label in _RESERVED_LABELS:
            raise RulesError(f"{selector!r}: the rules set {label!r} themselves")
        if op in ("=~", "!~"):
            try:
                re.compile(value.replace('\\"', '"'))
            except re.error as exc:
                message = f"{selector!r}: {value!r} is not a regular expression ({exc})"
                raise RulesError(message) from None
        matchers.append(f'{label}{op}"{value}"')
        position = match.end()
    return ", ".join(matchers)


def quote(value: str) -> str:
    """A PromQL string literal."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def metric(metric_name: str, selector: str, /, **labels: str) -> str:
    """`name{label="value", <selector>}`; a bare name when there is nothing to match."""
    matchers = [f"{label}={quote(value)}" for label, value in labels.items()]
    if selector:
        matchers.append(selector)
    return f"{metric_name}{{{', '.join(matchers)}}}" if matchers else metric_name


@dataclass(frozen=True)
class Links:
    """Where alerts point their readers: the runbook page and the Grafana the dashboards are in."""

    #: docs/runbooks.md as published; each alert links to `#<alertname in lower case>`.
    runbooks: str
    #: Grafana's base URL (`http://localhost:3000` in the compose stack).
    grafana: str

    def runbook(self, alert: str) -> str:
        return f"{self.runbooks}#{alert.lower()}"

    def dashboard(self, uid: str, **variables: str) -> str:
        """A dashboard URL; `variables` values may be alert templates (`{{ $labels.name }}`)."""
        query = "&".join(f"var-{name}={value}" for name, value in variables.items())
        return f"{self.grafana.rstrip('/')}/d/{uid}" + (f"?{query}" if query else "")


#: Where the rules point by default. Override with --runbook-url / --grafana-url.
DEFAULT_RUNBOOKS = (
    "https://github.com/celery-observability/celery-observability/blob/main/docs/runbooks.md"
)
DEFAULT_GRAFANA = "http://localhost:3000"
DEFAULT_LINKS = Links(DEFAULT_RUNBOOKS, DEFAULT_GRAFANA)

#: The dashboards' stable uids (celery_obs.dashboards builds them with these).
OVERVIEW_UID = "celery-overview"
TASK_UID = "celery-task"
WORKERS_UID = "celery-workers-queues"


def label_in_url(label: str) -> str:
    """The alert template of a label's value, URL-quoted, for a dashboard link."""
    return "{{ $labels." + label + " | urlquery }}"


class Literal(str):
    """A string YAML writes as a `|` block (multi-line PromQL stays readable)."""


def _literal(dumper: yaml.SafeDumper, value: Literal) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")


class _Dumper(yaml.SafeDumper):
    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        # Lists indented under their key, as Prometheus' own examples write rule files.
        super().increase_indent(flow, False)


_Dumper.add_representer(Literal, _literal)


def expr(text: str) -> str:
    """An expression as written in a rule file: multi-line ones as a `|` block."""
    text = text.strip()
    return Literal(text + "\n") if "\n" in text else text


def dump(header: str, groups: list[dict]) -> str:
    """A rule file as YAML text; the same input gives the same bytes."""
    return dump_object(header, {"groups": groups})


def dump_object(header: str, document: dict) -> str:
    """Any YAML document with a comment header; the same input gives the same bytes."""
    comment = "".join(f"# {line}".rstrip() + "\n" for line in header.strip().splitlines())
    return comment + yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=100)
