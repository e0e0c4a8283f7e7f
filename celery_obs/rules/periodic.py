"""Dead-man's switches for periodic tasks, one line per task (`celery-obs rules periodic`).

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

Both take the max over exporter replicas (`max by (name)`), so HA replicas alert once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .promql import (
    DEFAULT_LINKS,
    TASK_UID,
    Links,
    RulesError,
    check_selector,
    dump,
    expr,
    label_in_url,
    metric,
    parse_duration,
)

#: How far around "d ago" the exporter must have been up for a missing success to count.
_PRESENT_WINDOW = "10m"


@dataclass(frozen=True)
class Periodic:
    name: str
    #: The Prometheus duration as given, and in seconds.
    every: str
    seconds: float


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


def _rules_for(task: Periodic, selector: str, severity: str, links: Links) -> list[dict]:
    succeeded = metric("celery_task_last_succeeded_timestamp_seconds", selector, name=task.name)
    failed = metric("celery_task_last_failed_timestamp_seconds", selector, name=task.name)
    exporter = metric("celery_exporter_build_info", selector)
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
    dashboard = links.dashboard(TASK_UID, task=label_in_url("name"))
    return [
        {
            "alert": "CeleryPeriodicTaskNotSucceeded",
            "expr": expr(not_succeeded),
            # `name` is in the result already; as a rule label it also tells the rules apart
            # (promtool's lint rejects rules with equal names and labels).
            "labels": {"severity": severity, "name": task.name},
            "annotations": {
                "summary": "A periodic Celery task has not succeeded on schedule.",
                "description": (
                    f"No success of {{{{ $labels.name }}}} in the last {task.every}: its schedule "
                    "did not run it, it failed, or it is still running."
                ),
                "runbook_url": links.runbook("CeleryPeriodicTaskNotSucceeded"),
                "dashboard_url": dashboard,
            },
        },
        {
            "alert": "CeleryPeriodicTaskLastRunFailed",
            "expr": expr(last_failed),
            "labels": {"severity": severity, "name": task.name},
            "annotations": {
                "summary": "The last run of a periodic Celery task failed.",
                "description": (
                    "{{ $labels.name }} failed after its last success (or failed and has not "
                    "succeeded since the exporter started)."
                ),
                "runbook_url": links.runbook("CeleryPeriodicTaskLastRunFailed"),
                "dashboard_url": dashboard,
            },
        },
    ]


def periodic_rules(
    tasks: Sequence[Periodic],
    selector: str = "",
    severity: str = "warning",
    links: Links = DEFAULT_LINKS,
) -> str:
    """The rule file for `tasks`, as YAML text (deterministic: same input, same bytes)."""
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        twice = sorted({name for name in names if names.count(name) > 1})
        raise RulesError(f"a task is given twice: {', '.join(twice)}")
    checked = check_selector(selector)
    rules = [rule for task in tasks for rule in _rules_for(task, checked, severity, links)]
    header = (
        "Dead-man's switches for periodic Celery tasks, generated by `celery-obs rules periodic`.\n"
        "Load it beside celery-alerts.yml (rule_files in prometheus.yml)."
    )
    return dump(header, [{"name": "celery-periodic", "rules": rules}])
