"""The shipped recording and alert rules, as code: `celery-obs rules alerts` writes them for a
scrape selector of your choosing (under the Prometheus Operator the job label is the Service's
name, so a hard-coded `job="celery-exporter"` would make CeleryExporterAbsent fire forever).

Conventions (those of the monitoring mixins):
- Recording rules are named `<labels kept>:<metric>:<operation>`; they keep `job` (one job per
  cluster) and drop the replica labels: every rule and alert about the cluster takes the max over
  exporter replicas first (`promql.DEDUP`), so two HA replicas give the numbers of one and one
  alert, not two. Alerts about an exporter itself keep `instance`.
- Every alert has a `severity` label (critical: page; warning: look today; info: for the record),
  a static `summary`, the details in `description`, a `runbook_url` into docs/runbooks.md and a
  `dashboard_url` into the dashboard that shows it.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

from celery_obs.exporter import metrics as m

from .promql import (
    CLUSTER_BY,
    DEDUP,
    DEFAULT_LINKS,
    DEFAULT_SELECTOR,
    OVERVIEW_UID,
    REPLICA_LABELS,
    TASK_UID,
    WORKERS_UID,
    Links,
    check_selector,
    dump,
    dump_object,
    expr,
    label_in_url,
    metric,
)

SUCCEEDED = m.TASK_COUNTERS["task-succeeded"].name
FAILED = m.TASK_COUNTERS["task-failed"].name
RECEIVED = m.TASK_COUNTERS["task-received"].name

#: Task rates and ratios, by the labels they keep.
TASK_LEVEL = "job_name_queue_name"
TASK_BY = f"{CLUSTER_BY}, name, queue_name"
QUEUE_BY = f"{CLUSTER_BY}, queue_name"


def rec(level: str, metric_name: str, operation: str) -> str:
    """A recording rule's name: `level:metric:operation`."""
    return f"{level}:{metric_name.removesuffix('_total')}:{operation}"


SUCCEEDED_RATE = rec(TASK_LEVEL, SUCCEEDED, "rate5m")
FAILED_RATE = rec(TASK_LEVEL, FAILED, "rate5m")
FINISHED_RATE = rec(TASK_LEVEL, "celery_task_finished", "rate5m")
FAILURE_RATIO = rec(TASK_LEVEL, "celery_task_failure", "ratio5m")
RECEIVED_RATE = rec(TASK_LEVEL, RECEIVED, "rate5m")
HISTOGRAMS = (m.TASK_RUNTIME, m.TASK_QUEUE_WAIT, m.TASK_LATENCY)
P95 = {spec.name: rec(TASK_LEVEL, spec.name, "p95_5m") for spec in HISTOGRAMS}
QUEUE_WAIT_P95 = rec("job_queue_name", m.TASK_QUEUE_WAIT.name, "p95_5m")
WORKERS_UP = rec("job", "celery_workers_up", "sum")
TASK_EVENTS_RATE = rec("job", "celery_exporter_task_events", "rate10m")
PROCESSED_RATE = rec("job", m.WORKER_TASKS_PROCESSED.name, "rate10m")


def recording_rules(selector: str) -> list[dict]:
    def s(spec: m.MetricSpec, suffix: str = "", **labels: str) -> str:
        return metric(spec.name + suffix, selector, **labels)

    def task_rate(spec: m.MetricSpec) -> str:
        return f"sum by ({TASK_BY}) ({DEDUP} (rate({s(spec)}[5m])))"

    def p95(spec: m.MetricSpec, by: str) -> str:
        inner = f"{DEDUP} (rate({s(spec, '_bucket')}[5m]))"
        return f"histogram_quantile(0.95, sum by ({by}, le) ({inner}))"

    task_events = metric(
        m.EXPORTER_EVENTS.name, ", ".join(filter(None, ['type=~"task-.*"', selector]))
    )
    rules = [
        {"record": SUCCEEDED_RATE, "expr": task_rate(m.TASK_COUNTERS["task-succeeded"])},
        {"record": FAILED_RATE, "expr": task_rate(m.TASK_COUNTERS["task-failed"])},
        {
            "record": FINISHED_RATE,
            "expr": f'sum by ({TASK_BY}) ({{__name__=~"{SUCCEEDED_RATE}|{FAILED_RATE}"}})',
        },
        # Share of finished tasks that failed (0..1); absent for tasks that never failed.
        {
            "record": FAILURE_RATIO,
            "expr": f"{FAILED_RATE}\n/ on ({TASK_BY}) ({FINISHED_RATE} > 0)",
        },
        {"record": RECEIVED_RATE, "expr": task_rate(m.TASK_COUNTERS["task-received"])},
        *({"record": P95[spec.name], "expr": p95(spec, TASK_BY)} for spec in HISTOGRAMS),
        {"record": QUEUE_WAIT_P95, "expr": p95(m.TASK_QUEUE_WAIT, QUEUE_BY)},
        {"record": WORKERS_UP, "expr": f"sum by ({CLUSTER_BY}) ({DEDUP} ({s(m.WORKER_UP)}))"},
        {
            "record": TASK_EVENTS_RATE,
            "expr": f"sum by ({CLUSTER_BY}) ({DEDUP} (rate({task_events}[10m])))",
        },
        {
            "record": PROCESSED_RATE,
            "expr": f"sum by ({CLUSTER_BY}) ({DEDUP} (rate({s(m.WORKER_TASKS_PROCESSED)}[10m])))",
        },
    ]
    return [{"record": r["record"], "expr": expr(r["expr"])} for r in rules]


@dataclass
class Alert:
    name: str
    expr: str
    severity: str
    summary: str
    description: str
    #: The dashboard that shows it, and its variables (alert templates allowed).
    dashboard: str
    variables: dict[str, str] = field(default_factory=dict)
    for_: str = ""
    #: Why the expression is what it is, written into the rule file above the rule.
    why: str = ""

    def rule(self, links: Links) -> dict:
        rule: dict = {"alert": self.name, "expr": expr(self.expr)}
        if self.for_:
            rule["for"] = self.for_
        rule["labels"] = {"severity": self.severity}
        rule["annotations"] = {
            "summary": self.summary,
            "description": self.description,
            "runbook_url": links.runbook(self.name),
            "dashboard_url": links.dashboard(self.dashboard, **self.variables),
        }
        return rule


def alerts(selector: str) -> list[Alert]:
    def s(spec: m.MetricSpec, **labels: str) -> str:
        return metric(spec.name, selector, **labels)

    def dedup(spec: m.MetricSpec) -> str:
        return f"{DEDUP} ({s(spec)})"

    task_vars = {"job": label_in_url("job"), "task": label_in_url("name")}
    job_vars = {"job": label_in_url("job")}
    queue_vars = {"job": label_in_url("job"), "queue": label_in_url("queue_name")}
    up = metric("up", selector)
    return [
        Alert(
            "CeleryTaskFailureRateHigh",
            f"{FAILURE_RATIO} > 0.1\nand on ({TASK_BY})\n{FINISHED_RATE} * 300 >= 20",
            "warning",
            "A Celery task fails often.",
            "{{ $value | humanizePercentage }} of {{ $labels.name }} tasks on queue "
            "{{ $labels.queue_name }} failed over the last 5 minutes (at least 20 finished), "
            "for 10 minutes.",
            TASK_UID,
            task_vars,
            for_="10m",
            why="At least 20 finished tasks in 5 minutes: one failure of a rare task does not "
            "page.",
        ),
        Alert(
            "CeleryWorkerDown",
            f"{dedup(m.WORKER_LOST)} == 1",
            "warning",
            "A Celery worker is lost.",
            "{{ $labels.hostname }} stopped sending heartbeats without shutting down (no "
            "worker-offline event) and has not come back for 2 minutes.",
            WORKERS_UID,
            job_vars,
            for_="2m",
            why="Only a lost worker: one silent without a worker-offline event (SIGKILL, OOM, a "
            "lost node) or restarted without shutting down. A warm shutdown (scale-in, deploy) "
            "sets celery_worker_up to 0 and leaves celery_worker_lost at 0.",
        ),
        Alert(
            "CeleryQueueWithoutWorkers",
            f"{dedup(m.QUEUE_LENGTH)} > 0\nunless on ({QUEUE_BY})\n"
            f"sum by ({QUEUE_BY}) ({RECEIVED_RATE}) > 0",
            "critical",
            "A Celery queue has messages but no worker takes them.",
            "{{ $labels.queue_name }} holds {{ $value }} messages and no worker received a task "
            "from it in the last 5 minutes, for 10 minutes.",
            WORKERS_UID,
            queue_vars,
            for_="10m",
        ),
        Alert(
            "CeleryQueueBacklogHigh",
            f"{dedup(m.QUEUE_LENGTH)} > 1000",
            "warning",
            "A Celery queue holds a large backlog.",
            "{{ $labels.queue_name }} has held more than 1000 messages for 15 minutes (now "
            "{{ $value }}).",
            WORKERS_UID,
            queue_vars,
            for_="15m",
        ),
        Alert(
            "CeleryQueueBacklogGrowing",
            f"{dedup(m.QUEUE_LENGTH)} > 100\nand {DEDUP} (deriv({s(m.QUEUE_LENGTH)}[15m])) > 0",
            "warning",
            "A Celery queue keeps growing.",
            "{{ $labels.queue_name }} holds more than 100 messages and has grown for 30 minutes.",
            WORKERS_UID,
            queue_vars,
            for_="30m",
        ),
        Alert(
            "CeleryQueueWaitHigh",
            f"{QUEUE_WAIT_P95} > 300",
            "warning",
            "Celery tasks wait long in a queue.",
            "The 95th percentile time from publish to start on {{ $labels.queue_name }} is "
            "{{ $value | humanizeDuration }}, above 5 minutes for 10 minutes (ETA/countdown "
            "delays excluded).",
            WORKERS_UID,
            queue_vars,
            for_="10m",
        ),
        Alert(
            "CeleryTaskRunningLong",
            f"{dedup(m.TASK_OLDEST_ACTIVE_AGE)} > 3600",
            "warning",
            "A Celery task has been running for over an hour.",
            "The longest-running {{ $labels.name }} task on queue {{ $labels.queue_name }} has "
            "run for {{ $value | humanizeDuration }} and has not finished.",
            TASK_UID,
            task_vars,
            for_="5m",
            why="One hour suits most task code; exclude (or give their own rule) tasks that are "
            "long on purpose, e.g. "
            'celery_task_oldest_active_age_seconds{name!~"reports\\\\..*"}.',
        ),
        Alert(
            "CeleryTasksWaitingOnBusyWorkers",
            f"{dedup(m.TASK_OLDEST_WAITING_AGE)} > 300",
            "warning",
            "Celery tasks wait on a busy worker.",
            "A {{ $labels.name }} task on queue {{ $labels.queue_name }} was handed to a worker "
            "(prefetched) {{ $value | humanizeDuration }} ago and has not started.",
            TASK_UID,
            task_vars,
            for_="5m",
            why="Received by a worker, due, and not started: stuck behind that worker's running "
            "tasks (prefetching) while other workers may be idle.",
        ),
        Alert(
            "CeleryTasksLostWithWorker",
            f"sum by ({TASK_BY}) ({DEDUP} (increase({s(m.TASK_WORKER_LOST)}[15m]))) > 0",
            "info",
            "Celery tasks were on a worker that was lost.",
            "In the last 15 minutes a worker died (no heartbeat, or restarted without shutting "
            'down) while running or holding about {{ $value | printf "%.0f" }} '
            "{{ $labels.name }} tasks from {{ $labels.queue_name }}.",
            TASK_UID,
            task_vars,
        ),
        Alert(
            "CeleryExporterDown",
            f"{DEDUP} ({up}) == 0",
            "critical",
            "No Celery exporter replica can be scraped.",
            "Prometheus has failed to scrape every replica of {{ $labels.job }} for 2 minutes: "
            "no Celery metric is fresh and every other Celery alert is blind.",
            OVERVIEW_UID,
            job_vars,
            for_="2m",
            why="Every replica down. One of several down is CeleryExporterReplicaDown. The target "
            "labels other than the replica's (namespace, service under the Operator) stay.",
        ),
        Alert(
            "CeleryExporterReplicaDown",
            f"{up} == 0\nand ignoring ({', '.join(REPLICA_LABELS)}) {DEDUP} ({up}) == 1",
            "warning",
            "A Celery exporter replica cannot be scraped.",
            "Prometheus has failed to scrape {{ $labels.instance }} for 5 minutes; another "
            "replica of {{ $labels.job }} still reports.",
            OVERVIEW_UID,
            job_vars,
            for_="5m",
        ),
        Alert(
            "CeleryExporterAbsent",
            f"absent({up})",
            "critical",
            "No Celery exporter is being scraped.",
            f"Prometheus has no target matching {{{selector}}} at all for 5 minutes.",
            OVERVIEW_UID,
            for_="5m",
        ),
        Alert(
            "CeleryExporterBrokerDisconnected",
            f"{s(m.EXPORTER_BROKER_CONNECTED)} == 0",
            "critical",
            "A Celery exporter is not connected to the broker.",
            "{{ $labels.instance }} has been disconnected from the broker for 2 minutes: no "
            "events, so its task metrics are frozen. It reconnects by itself; /healthz says "
            "why it cannot.",
            OVERVIEW_UID,
            job_vars,
            for_="2m",
        ),
        Alert(
            "CeleryTaskEventsMissing",
            f"{PROCESSED_RATE} > 0\nunless on ({CLUSTER_BY}) {TASK_EVENTS_RATE} > 0",
            "warning",
            "Celery workers process tasks but send no task events.",
            "Workers of {{ $labels.job }} processed tasks in the last 10 minutes but no task "
            "event reached the exporter: task counters and latencies are blind.",
            OVERVIEW_UID,
            job_vars,
            for_="15m",
            why="`unless ... > 0`, not `and ... == 0`: with no task event ever, there is no "
            "series. Task events are off (no -E) or the exporter cannot see them.",
        ),
        Alert(
            "CeleryExporterLosingData",
            "\nor ".join(
                f"increase({s(spec)}[15m]) > 0"
                for spec in (
                    m.EXPORTER_MALFORMED,
                    m.EXPORTER_TASKS_EVICTED,
                    m.EXPORTER_LABEL_OVERFLOW,
                    m.EXPORTER_BACKLOG_FULL,
                )
            ),
            "info",
            "A Celery exporter drops or folds data.",
            "In the last 15 minutes {{ $labels.instance }} skipped malformed events, evicted "
            "unfinished tasks from its table, folded label values into 'other', or paused its "
            "Redis reader because its backlog was full.",
            OVERVIEW_UID,
            job_vars,
        ),
    ]


def rule_files(selector: str = DEFAULT_SELECTOR, links: Links = DEFAULT_LINKS) -> dict[str, str]:
    """File name -> YAML text of the recording and alert rules for `selector`."""
    checked = check_selector(selector)
    generated = "Generated by `celery-obs rules alerts`"
    if checked != DEFAULT_SELECTOR:
        generated += f" --selector '{checked}'"
    recording = dump(
        f"Recording rules shared by the Grafana dashboards and the alerts. {generated}.\n"
        "Names are <labels kept>:<metric>:<operation>; every rule also keeps cluster and\n"
        "namespace where targets have them. Each takes the max over exporter replicas\n"
        "(instance, pod) first: two HA replicas give the numbers of one.",
        [{"name": "celery-recording", "rules": recording_rules(checked)}],
    )
    listed = alerts(checked)
    text = dump(
        f"Alerts for Celery clusters watched by celery-obs. {generated}.\n"
        "Each has promtool cases in prometheus/tests/ that fire and stay quiet; each links its\n"
        "runbook (docs/runbooks.md). Thresholds are starting points: tune them to your cluster.",
        [{"name": "celery-alerts", "rules": [alert.rule(links) for alert in listed]}],
    )
    for alert in listed:  # each rule's reason, as a comment above it
        if alert.why:
            comment = "".join(f"      # {line}\n" for line in textwrap.wrap(alert.why, 88))
            rule = f"\n      - alert: {alert.name}\n"
            text = text.replace(rule, "\n" + comment + rule[1:], 1)
    return {"celery-recording.yml": recording, "celery-alerts.yml": text}


def prometheus_rule(
    selector: str = DEFAULT_SELECTOR, links: Links = DEFAULT_LINKS, name: str = "celery-exporter"
) -> str:
    """The same recording and alert rules as one Prometheus Operator PrometheusRule. Under the
    Operator a ServiceMonitor's job label is the Service's name: the default selector matches
    the Service deploy/kubernetes creates."""
    checked = check_selector(selector)
    generated = "Generated by `celery-obs rules prometheus-rule`"
    if checked != DEFAULT_SELECTOR:
        generated += f" --selector '{checked}'"
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": name},
        "spec": {
            "groups": [
                {"name": "celery-recording", "rules": recording_rules(checked)},
                {
                    "name": "celery-alerts",
                    "rules": [alert.rule(links) for alert in alerts(checked)],
                },
            ]
        },
    }
    header = (
        f"{generated}: the rules of prometheus/rules/ for the Prometheus Operator.\n"
        "Each alert's reason is in prometheus/rules/celery-alerts.yml."
    )
    return dump_object(header, rule)
