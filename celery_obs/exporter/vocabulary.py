"""The event types the exporter understands, and what each one means for a task's story.

One table instead of knowledge spread over handlers: which events carry the attempt number
(`retries`), which end a delivery of the task to a worker, which end the task for good. Celery's
own sources decide it (celery/app/amqp.py for task-sent, celery/worker/strategy.py for
task-received, celery/worker/request.py for the rest).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskEventType:
    name: str
    #: The event carries `retries`, the attempt number (only task-sent and task-received do).
    numbered: bool = False
    #: The event closes one delivery of the task to a worker (the attempt ran, or will not run).
    ends_delivery: bool = False
    #: After this event nothing more is expected for the task id (unless it is sent again).
    final: bool = False
    #: The event has a counter of its own (`celery_task_<type>_total`).
    counted: bool = True


TASK_EVENTS: dict[str, TaskEventType] = {
    t.name: t
    for t in (
        TaskEventType("task-sent", numbered=True),
        TaskEventType("task-received", numbered=True),
        TaskEventType("task-started"),
        TaskEventType("task-succeeded", ends_delivery=True, final=True),
        # A hard time limit makes Celery send task-failed twice for one delivery; both are
        # events of the stream and both are counted (the second measures nothing).
        TaskEventType("task-failed", ends_delivery=True, final=True),
        # The retry itself is a new task-sent (retries + 1) from the worker.
        TaskEventType("task-retried", ends_delivery=True),
        TaskEventType("task-revoked", ends_delivery=True, final=True),
        # Final unless requeued (`requeue=True`): the tracker looks at the field.
        TaskEventType("task-rejected", ends_delivery=True, final=True),
        # The worker lost its broker connection before running the task: the message will be
        # delivered again. It ends that delivery; it has no counter.
        TaskEventType("task-cancelled", ends_delivery=True, counted=False),
    )
}

WORKER_EVENTS = frozenset({"worker-online", "worker-heartbeat", "worker-offline"})

#: Every type counted under its own name in `celery_exporter_events_total`; anything else is
#: counted as `other` (a bounded label however many types a sender invents).
KNOWN_EVENT_TYPES = frozenset({*TASK_EVENTS, *WORKER_EVENTS})
