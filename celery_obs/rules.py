"""`celery-obs rules periodic`: dead-man's switches for periodic tasks, one line per task.

Beat schedules differ per cluster, so these alerts cannot be in the shipped rule files: the user
says which task must succeed how often (`reports.nightly=26h`) and gets a rule file for it.

Per task, `CeleryPeriodicTaskNotSucceeded` fires when its last success is older than the given
duration. Two facts make that harder than `time() - last_succeeded > d`:

- The exporter keeps the last success in memory; after it restarts the series is gone until the
  next success. Prometheus still has the old samples: `max_over_time(...[d])` reads the last
  known success across the restart for as long as it matters.
- A task that never succeeded has no series at all. `absent_over_time(...[d])` catches it, but
  only once the exporter has been watching for `d` (it was up `d` ago), so a fresh install does
  not page for tasks that simply have not had their turn yet.

`CeleryPeriodicTaskLastRunFailed` fires when the task's latest outcome is a failure (a rare task
failing once never reaches the failure-rate alert's volume floor).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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
#: Labels the generated rules set themselves.
_RESERVED_LABELS = frozenset({"__name__", "name"})
#: How far around "d ago" the exporter must have been up for a missing success to count.
_PRESENT_WINDOW = "10m"


class RulesError(ValueError):
    """A task spec or selector that cannot become a rule: the message says which and why."""


@dataclass(frozen=True)
class Periodic:
    name: str
    #: The Prometheus duration as given, and in seconds.
    every: str
    seconds: float


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


def parse_periodic(spec: str) -> Periodic:
    """`NAME=DURATION`, the name as Celery registers it (`reports.tasks.nightly`)."""
    name, sep, every = spec.strip().rpartition("=")
    name = name.strip()
    if not sep or not name:
        raise RulesError(f"{spec!r}: expected TASK_NAME=DURATION, e.g. reports.nightly=26h")
    if "{{" in name or "}}" in name:
        # Prometheus expands alert labels as templates: such a name would not survive.
        raise RulesError(f"{name!r}: a task name with '{{{{' or '}}}}' cannot be an alert label")
    return Periodic(name, every.strip(), parse_duration(every.strip()))


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
                f"(stuck at {text[position : position + 20]!r})"
            )
        label, op, value = match.group("label", "op", "value")
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


def _quote(value: str) -> str:
    """A PromQL string literal."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _metric(name: str, selector: str, task: str | None = None) -> str:
    matchers = [f"name={_quote(task)}"] if task is not None else []
    if selector:
        matchers.append(selector)
    return f"{name}{{{', '.join(matchers)}}}"


def _rules_for(task: Periodic, selector: str, severity: str) -> list[dict]:
    succeeded = _metric("celery_task_last_succeeded_timestamp_seconds", selector, task.name)
    failed = _metric("celery_task_last_failed_timestamp_seconds", selector, task.name)
    exporter = _metric("celery_exporter_build_info", selector)
    seconds = str(int(task.seconds)) if task.seconds == int(task.seconds) else repr(task.seconds)
    not_succeeded = (
        f"time() - max by (name) (max_over_time({succeeded}[{task.every}])) > {seconds}\n"
        f"or\n"
        f"max by (name) (absent_over_time({succeeded}[{task.every}]))\n"
        f"  and on () count(present_over_time({exporter}[{_PRESENT_WINDOW}] "
        f"offset {task.every})) > 0\n"
    )
    last_failed = (
        f"max by (name) ({failed})\n"
        f"  > on (name) (max by (name) ({succeeded}) or max by (name) ({failed}) * 0)\n"
    )
    return [
        {
            "alert": "CeleryPeriodicTaskNotSucceeded",
            "expr": not_succeeded,
            # `name` is in the result already; as a rule label it also tells the rules apart
            # (promtool's lint rejects rules with equal names and labels).
            "labels": {"severity": severity, "name": task.name},
            "annotations": {
                "summary": (
                    f"Periodic task {{{{ $labels.name }}}} has not succeeded for {task.every}"
                ),
                "description": (
                    f"No success of {{{{ $labels.name }}}} in the last {task.every}: its schedule "
                    "did not run it, it failed, or it is still running."
                ),
                "runbook": (
                    "Is beat running (one instance), and does it publish the task "
                    "(celery_task_last_sent_timestamp_seconds)? Did it fail "
                    "(celery_task_last_failed_timestamp_seconds, and its logs in Kibana), or is "
                    "it still running (celery_task_oldest_active_age_seconds)?"
                ),
            },
        },
        {
            "alert": "CeleryPeriodicTaskLastRunFailed",
            "expr": last_failed,
            # `name` is in the result already; as a rule label it also tells the rules apart
            # (promtool's lint rejects rules with equal names and labels).
            "labels": {"severity": severity, "name": task.name},
            "annotations": {
                "summary": "The last run of periodic task {{ $labels.name }} failed",
                "description": (
                    "{{ $labels.name }} failed after its last success (or failed and has not "
                    "succeeded since the exporter started)."
                ),
                "runbook": (
                    "Open the Task drill-down dashboard for {{ $labels.name }}: the exceptions "
                    "panel names the exception, its Kibana link the failing run's logs."
                ),
            },
        },
    ]


class _Literal(str):
    """A string YAML writes as a `|` block (the multi-line PromQL stays readable)."""


def _literal(dumper: yaml.SafeDumper, value: _Literal) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Literal, _literal)


def periodic_rules(tasks: Sequence[Periodic], selector: str = "", severity: str = "warning") -> str:
    """The rule file for `tasks`, as YAML text (deterministic: same input, same bytes)."""
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        twice = sorted({name for name in names if names.count(name) > 1})
        raise RulesError(f"a task is given twice: {', '.join(twice)}")
    rules = []
    for task in tasks:
        for rule in _rules_for(task, check_selector(selector), severity):
            rule["expr"] = _Literal(rule["expr"])
            rules.append(rule)
    document = {"groups": [{"name": "celery-periodic", "rules": rules}]}
    header = (
        "# Dead-man's switches for periodic Celery tasks, generated by `celery-obs rules "
        "periodic`.\n# Load it beside celery-alerts.yml (rule_files in prometheus.yml).\n"
    )
    return header + yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=100)


# -- command line ---------------------------------------------------------------------------------


def add_rules_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "rules",
        help="Generate Prometheus rules for your cluster (periodic tasks' dead-man's switches).",
        description="Generate Prometheus rules that depend on your cluster.",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    periodic = actions.add_parser(
        "periodic",
        help="Alert when a periodic task has not succeeded for a while.",
        description=(
            "Write alert rules that fire when a task has not succeeded for the given duration "
            "(CeleryPeriodicTaskNotSucceeded) or its latest run failed "
            "(CeleryPeriodicTaskLastRunFailed). Give tasks as NAME=DURATION, or @FILE with one "
            "per line. Example: celery-obs rules periodic reports.nightly=26h "
            "billing.sync=20m --out prometheus/rules/celery-periodic.yml"
        ),
        fromfile_prefix_chars="@",
    )
    periodic.add_argument(
        "tasks",
        nargs="+",
        metavar="NAME=DURATION",
        help="A task name as Celery registers it, and how long it may go without a success "
        "(a Prometheus duration: 26h, 90m, 1d12h). Allow for its schedule and its run time.",
    )
    periodic.add_argument(
        "--selector",
        default="",
        metavar="MATCHERS",
        help='Label matchers added to every series, e.g. job="celery-exporter" when several '
        "clusters share a Prometheus [default none]",
    )
    periodic.add_argument(
        "--severity",
        default="warning",
        choices=("critical", "warning", "info"),
        help="The alerts' severity label [default warning]",
    )
    periodic.add_argument(
        "--out", type=Path, metavar="FILE", help="Write here instead of to standard output."
    )


def run(args: argparse.Namespace) -> int:
    # From an @FILE: blank lines and # comments are not tasks.
    specs = [spec for spec in args.tasks if spec.strip() and not spec.lstrip().startswith("#")]
    try:
        if not specs:
            raise RulesError("no tasks given")
        tasks = [parse_periodic(spec) for spec in specs]
        text = periodic_rules(tasks, args.selector, args.severity)
    except RulesError as exc:
        print(f"celery-obs rules: {exc}", file=sys.stderr)
        return 2
    if args.out is None:
        sys.stdout.write(text)
        return 0
    try:
        args.out.write_text(text)
    except OSError as exc:
        print(f"celery-obs rules: cannot write {args.out}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {2 * len(tasks)} rules for {len(tasks)} periodic tasks")
    return 0
