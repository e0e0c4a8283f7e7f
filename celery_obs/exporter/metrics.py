"""The metric catalogue: every metric the exporter serves, in one place.

Names, types, label sets, help texts and default buckets live here and nowhere else. The collector
renders from this table, the README's metric table is checked against it by a test, and later the
dashboards and alert rules read their metric names from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MetricType = Literal["counter", "gauge", "histogram", "info"]

#: Histogram buckets (seconds), one layout per histogram: what each measures spans a different
#: range, and every bucket is a series per (task name, queue) (runtime twice: by outcome), so
#: each layout holds only the bounds its dashboards and alerts need. With these a (name, queue)
#: has 2 x 9 runtime, 8 queue-wait and 8 latency bucket series plus a _sum and _count each: 42
#: histogram series of the 53 a busy (name, queue) has, and 50 task names scrape in 290 kB
#: (docs/metrics.md). Native histograms (protobuf exposition) give exact resolution besides;
#: the `--*-buckets` flags change these.
#:
#: Runtime: task code, from a few ms to an hour; longer runs land in +Inf (the oldest active
#: task's age gauge measures those to the second).
RUNTIME_BUCKETS: tuple[float, ...] = (0.01, 0.05, 0.25, 1.0, 5.0, 30.0, 300.0, 3600.0)
#: Queue wait: milliseconds when workers keep up, minutes to hours in a backlog; 300 s is the
#: CeleryQueueWaitHigh threshold.
QUEUE_WAIT_BUCKETS: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 1800.0)
#: Latency (send to finish): queue wait plus runtime, so it starts higher.
LATENCY_BUCKETS: tuple[float, ...] = (0.1, 0.5, 2.5, 10.0, 60.0, 300.0, 3600.0)


@dataclass(frozen=True)
class BucketLayout:
    """The finite upper bounds of each duration histogram (+Inf is implied)."""

    runtime: tuple[float, ...] = RUNTIME_BUCKETS
    queue_wait: tuple[float, ...] = QUEUE_WAIT_BUCKETS
    latency: tuple[float, ...] = LATENCY_BUCKETS

    def of(self, histogram: str) -> tuple[float, ...]:
        """`histogram`: runtime, queue_wait or latency."""
        bounds: tuple[float, ...] = getattr(self, histogram)
        return bounds


#: Label value used when a task name, exception or queue is beyond its cardinality limit.
OVERFLOW_LABEL = "other"
#: Label value used when an event does not say (and the in-flight table does not know) a value.
UNKNOWN_LABEL = "unknown"


@dataclass(frozen=True)
class MetricSpec:
    name: str
    type: MetricType
    help: str
    labels: tuple[str, ...] = ()

    @property
    def family(self) -> str:
        """Name of the metric family as OpenMetrics and prometheus_client spell it: counters
        without `_total`, info metrics without `_info`."""
        if self.type == "counter" and self.name.endswith("_total"):
            return self.name[: -len("_total")]
        if self.type == "info" and self.name.endswith("_info"):
            return self.name[: -len("_info")]
        return self.name

    @property
    def text_type(self) -> str:
        """Its type in the Prometheus text format 0.0.4, which has no info type."""
        return "gauge" if self.type == "info" else self.type


TASK_LABELS = ("name", "queue_name")

#: Task event type -> counter it increments. One counter per lifecycle step.
TASK_COUNTERS: dict[str, MetricSpec] = {
    "task-sent": MetricSpec(
        "celery_task_sent_total",
        "counter",
        "Tasks published by producers (needs task_send_sent_event on the producers).",
        TASK_LABELS,
    ),
    "task-received": MetricSpec(
        "celery_task_received_total",
        "counter",
        "Tasks received by a worker.",
        TASK_LABELS,
    ),
    "task-started": MetricSpec(
        "celery_task_started_total",
        "counter",
        "Tasks started by a worker.",
        TASK_LABELS,
    ),
    "task-succeeded": MetricSpec(
        "celery_task_succeeded_total",
        "counter",
        "Tasks that succeeded.",
        TASK_LABELS,
    ),
    "task-failed": MetricSpec(
        "celery_task_failed_total",
        "counter",
        "Tasks that failed, by exception class (NotRegistered for task names no worker knows).",
        (*TASK_LABELS, "exception"),
    ),
    "task-retried": MetricSpec(
        "celery_task_retried_total",
        "counter",
        "Task attempts that ended in a retry.",
        TASK_LABELS,
    ),
    "task-revoked": MetricSpec(
        "celery_task_revoked_total",
        "counter",
        "Tasks revoked (including expired and terminated).",
        TASK_LABELS,
    ),
    "task-rejected": MetricSpec(
        "celery_task_rejected_total",
        "counter",
        "Task messages rejected by a worker.",
        TASK_LABELS,
    ),
}

TASK_RUNTIME = MetricSpec(
    "celery_task_runtime_seconds",
    "histogram",
    "Execution time of the attempt that succeeded or failed, on the worker (Celery's runtime "
    "for successes; task-started to task-failed for failures). Never includes a retry countdown.",
    (*TASK_LABELS, "outcome"),
)
TASK_QUEUE_WAIT = MetricSpec(
    "celery_task_queue_wait_seconds",
    "histogram",
    "Per attempt: time from its task-sent (else its task-received) to its task-started, minus "
    "the wait its ETA/countdown asked for. Retries are observed once each.",
    TASK_LABELS,
)
TASK_LATENCY = MetricSpec(
    "celery_task_latency_seconds",
    "histogram",
    "Per task id: time from its first task-sent (else first task-received) to its success or "
    "failure, minus the first attempt's ETA/countdown; retries and their countdowns included.",
    TASK_LABELS,
)

TASK_ACTIVE = MetricSpec(
    "celery_task_active",
    "gauge",
    "Tasks started by a worker and not finished, now. A lost worker's tasks stop counting when "
    "it is declared lost (celery_task_worker_lost_total).",
    TASK_LABELS,
)
TASK_OLDEST_ACTIVE_AGE = MetricSpec(
    "celery_task_oldest_active_age_seconds",
    "gauge",
    "Age of the longest-running task now: scrape time minus its task-started (the worker's "
    "clock). Absent while none runs.",
    TASK_LABELS,
)
TASK_WAITING = MetricSpec(
    "celery_task_waiting",
    "gauge",
    "Tasks received by a worker (prefetched, reserved) and not started, now; ETA/countdown "
    "tasks count from their ETA on.",
    TASK_LABELS,
)
TASK_OLDEST_WAITING_AGE = MetricSpec(
    "celery_task_oldest_waiting_age_seconds",
    "gauge",
    "Age of the task waiting longest on a worker now: scrape time minus its task-received, or "
    "its ETA when later. Absent while none waits.",
    TASK_LABELS,
)
TASK_WORKER_LOST = MetricSpec(
    "celery_task_worker_lost_total",
    "counter",
    "Tasks running or waiting on a worker when it was declared lost or started again without "
    "a worker-offline: they died with it, or will be delivered again (acks_late, Redis' "
    "visibility timeout).",
    TASK_LABELS,
)

#: Task event type -> the "when did it last happen" gauge of each task name.
TASK_LAST_AT: dict[str, MetricSpec] = {
    "task-sent": MetricSpec(
        "celery_task_last_sent_timestamp_seconds",
        "gauge",
        "Unix time of the task name's latest task-sent (the event's time, never later than the "
        "exporter's clock). Kept for every name under --max-task-names.",
        ("name",),
    ),
    "task-succeeded": MetricSpec(
        "celery_task_last_succeeded_timestamp_seconds",
        "gauge",
        "Unix time of the task name's latest success: the dead-man's switch of periodic tasks.",
        ("name",),
    ),
    "task-failed": MetricSpec(
        "celery_task_last_failed_timestamp_seconds",
        "gauge",
        "Unix time of the task name's latest failure.",
        ("name",),
    ),
}

WORKER_UP = MetricSpec(
    "celery_worker_up",
    "gauge",
    "1 while the worker sends heartbeats; 0 after worker-offline or the worker timeout. "
    "Down workers are kept at 0 for the worker retention, then dropped.",
    ("hostname",),
)
WORKER_LOST = MetricSpec(
    "celery_worker_lost",
    "gauge",
    "1 when the worker stopped sending heartbeats without saying worker-offline (killed, OOM, "
    "node or network lost); 0 while it is up or after a graceful shutdown (scale-in, deploy).",
    ("hostname",),
)
WORKER_TASKS_ACTIVE = MetricSpec(
    "celery_worker_tasks_active",
    "gauge",
    "Tasks the worker is executing, from its last heartbeat.",
    ("hostname",),
)
WORKER_TASKS_PROCESSED = MetricSpec(
    "celery_worker_tasks_processed_total",
    "counter",
    "Tasks the worker has processed since it started, from its last heartbeat.",
    ("hostname",),
)
WORKER_TASKS_RESERVED = MetricSpec(
    "celery_worker_tasks_reserved",
    "gauge",
    "Tasks the worker has received and not started (prefetched; ETA tasks once due), from the "
    "task events.",
    ("hostname",),
)
WORKER_LAST_HEARTBEAT = MetricSpec(
    "celery_worker_last_heartbeat_timestamp_seconds",
    "gauge",
    "Unix time at which the exporter received the worker's last event.",
    ("hostname",),
)
WORKER_LOAD_AVERAGE = MetricSpec(
    "celery_worker_load_average",
    "gauge",
    "The worker host's load average over the window (1m, 5m, 15m), from its last heartbeat; "
    "absent while the worker is down.",
    ("hostname", "window"),
)
WORKER_INFO = MetricSpec(
    "celery_worker_info",
    "info",
    "Always 1; labels say what the worker runs (sw_ident, sw_ver: the Celery version, sw_sys).",
    ("hostname", "sw_ident", "sw_ver", "sw_sys"),
)

QUEUE_LENGTH = MetricSpec(
    "celery_queue_length",
    "gauge",
    "Messages waiting in the broker queue (Redis: all priority sub-queues summed).",
    ("queue_name",),
)

EXPORTER_EVENTS = MetricSpec(
    "celery_exporter_events_total",
    "counter",
    "Events consumed, by event type.",
    ("type",),
)
EXPORTER_MALFORMED = MetricSpec(
    "celery_exporter_malformed_events_total",
    "counter",
    "Messages or events that could not be used, by reason.",
    ("reason",),
)
EXPORTER_DUPLICATES = MetricSpec(
    "celery_exporter_duplicate_events_total",
    "counter",
    "Task events delivered again (same uuid, type, timestamp and hostname) and not counted again.",
    ("type",),
)
EXPORTER_BROKER_CONNECTED = MetricSpec(
    "celery_exporter_broker_connected",
    "gauge",
    "1 while the event consumer is connected to the broker.",
)
EXPORTER_RECONNECTS = MetricSpec(
    "celery_exporter_broker_reconnects_total",
    "counter",
    "Times the event consumer lost the broker connection and connected again.",
)
EXPORTER_LAST_EVENT = MetricSpec(
    "celery_exporter_last_event_timestamp_seconds",
    "gauge",
    "Unix time at which the last event was received (0 before the first).",
)
EXPORTER_TASKS_TRACKED = MetricSpec(
    "celery_exporter_tasks_tracked",
    "gauge",
    "Unfinished tasks held in the in-flight table (bounded by --max-tracked-tasks).",
)
EXPORTER_TASKS_EVICTED = MetricSpec(
    "celery_exporter_tasks_evicted_total",
    "counter",
    "Unfinished tasks dropped from the full in-flight table; their later events lose their name.",
)
EXPORTER_WORKERS_EVICTED = MetricSpec(
    "celery_exporter_workers_evicted_total",
    "counter",
    "Down workers dropped from the full worker table (--max-workers) to make room for a new one.",
)
EXPORTER_LABEL_OVERFLOW = MetricSpec(
    "celery_exporter_label_overflow_total",
    "counter",
    f"Events whose label value was beyond the label's limit and counted as '{OVERFLOW_LABEL}'.",
    ("label",),
)
EXPORTER_LABEL_TRUNCATED = MetricSpec(
    "celery_exporter_label_truncated_total",
    "counter",
    "Events whose label value was longer than 256 characters and was cut to that length.",
    ("label",),
)
EXPORTER_NEGATIVE_DURATIONS = MetricSpec(
    "celery_exporter_negative_durations_total",
    "counter",
    "Durations more negative than the skew tolerance (clocks of producer and worker hosts "
    "disagree), observed as 0. Smaller negatives are taken as 0 without being counted.",
    ("metric",),
)
EXPORTER_UNMEASURED = MetricSpec(
    "celery_exporter_unmeasured_durations_total",
    "counter",
    "Durations not observed because their two ends could not be paired with certainty "
    "(the event itself is still counted), by histogram and reason.",
    ("metric", "reason"),
)
EXPORTER_QUEUE_PROBE_ERRORS = MetricSpec(
    "celery_exporter_queue_probe_errors_total",
    "counter",
    "Queue length probes that failed (the last known length is kept).",
)
EXPORTER_BROADCAST_ERRORS = MetricSpec(
    "celery_exporter_broadcast_errors_total",
    "counter",
    "Broadcasts to the workers (heartbeat, enable_events) that failed; workers started "
    "without -E then send no task events.",
)
EXPORTER_BACKLOG_BYTES = MetricSpec(
    "celery_exporter_backlog_bytes",
    "gauge",
    "Redis: event bytes read off the socket and not yet processed.",
)
EXPORTER_BACKLOG_FULL = MetricSpec(
    "celery_exporter_backlog_full_total",
    "counter",
    "Redis: times the backlog reached --max-backlog-mb and reading paused (the server's "
    "pub/sub buffer then fills, and past its limit the server disconnects us).",
)
EXPORTER_EVENT_READER = MetricSpec(
    "celery_exporter_event_reader_info",
    "gauge",
    "1 for how events are read: redis-socket or amqp-socket (the fast paths), or kombu.",
    ("reader",),
)
EXPORTER_BUILD_INFO = MetricSpec(
    "celery_exporter_build_info",
    "info",
    "Always 1; labels say which exporter is running.",
    ("version",),
)

CATALOGUE: tuple[MetricSpec, ...] = (
    *TASK_COUNTERS.values(),
    TASK_RUNTIME,
    TASK_QUEUE_WAIT,
    TASK_LATENCY,
    TASK_ACTIVE,
    TASK_OLDEST_ACTIVE_AGE,
    TASK_WAITING,
    TASK_OLDEST_WAITING_AGE,
    TASK_WORKER_LOST,
    *TASK_LAST_AT.values(),
    WORKER_UP,
    WORKER_LOST,
    WORKER_TASKS_ACTIVE,
    WORKER_TASKS_RESERVED,
    WORKER_TASKS_PROCESSED,
    WORKER_LAST_HEARTBEAT,
    WORKER_LOAD_AVERAGE,
    WORKER_INFO,
    QUEUE_LENGTH,
    EXPORTER_EVENTS,
    EXPORTER_MALFORMED,
    EXPORTER_DUPLICATES,
    EXPORTER_BROKER_CONNECTED,
    EXPORTER_RECONNECTS,
    EXPORTER_LAST_EVENT,
    EXPORTER_TASKS_TRACKED,
    EXPORTER_TASKS_EVICTED,
    EXPORTER_WORKERS_EVICTED,
    EXPORTER_LABEL_OVERFLOW,
    EXPORTER_LABEL_TRUNCATED,
    EXPORTER_NEGATIVE_DURATIONS,
    EXPORTER_UNMEASURED,
    EXPORTER_QUEUE_PROBE_ERRORS,
    EXPORTER_BROADCAST_ERRORS,
    EXPORTER_BACKLOG_BYTES,
    EXPORTER_BACKLOG_FULL,
    EXPORTER_EVENT_READER,
    EXPORTER_BUILD_INFO,
)

BY_NAME: dict[str, MetricSpec] = {spec.name: spec for spec in CATALOGUE}
