"""A worker started the way users start it (`celery -A app worker -l INFO`, no -q) writes
nothing but JSON lines, on stdout by default: the banner is one `worker started` record, the
shutdown notice a record too, and every line that names a task carries its id and name."""

from __future__ import annotations

import json
import signal
import uuid
from types import SimpleNamespace

import pytest
from celery import Celery, chord, group

from celery_obs.log_shipping import console
from celery_obs.log_shipping.context import TaskContextFilter
from celery_obs.log_shipping.formatter import TASK_ATTR

from support import WorkerProcess, producer, wait_for


def json_lines(text: str) -> list[dict]:
    """Every non-empty line, parsed: a line that is not JSON fails the test, named."""
    records = []
    for line in text.splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:
                pytest.fail(f"not a JSON line: {line!r}")
    return records


@pytest.mark.broker
def test_a_worker_writes_only_json_and_names_every_task_it_logs_about(
    redis_url, queue, tmp_path
) -> None:
    # A chord needs a result backend: files in the test's own directory.
    backend = f"file://{tmp_path}"
    worker = WorkerProcess(
        redis_url,
        queue,
        f"console-{uuid.uuid4().hex[:6]}",
        events=False,
        app="logging_app",
        env={"OBS_TEST_BACKEND": backend},
        split_stderr=True,
    )
    try:
        wait_for(lambda: " ready." in worker.output(), 30, "the worker ready, on stdout")
        app = producer(redis_url, queue)
        ids = {
            "add": app.send_task("logs.add", (1, 2)).id,
            "fail": app.send_task("logs.fail").id,
            "hard": app.send_task("logs.sleep", (30,)).id,  # time_limit=1
            "soft": app.send_task("logs.soft_limit").id,
            "long": app.send_task("logs.long", (30,)).id,
        }
        members = group(app.signature("logs.add", (i, i)) for i in range(3)).apply_async()
        callback_id = send_chord(redis_url, backend, queue)
        eta = app.send_task("logs.add", (3, 4), countdown=1)
        ids["eta"] = eta.id
        wait_for(lambda: eta.id in worker.output(), 30, "the countdown task received")
        app.control.revoke(eta.id)
        wait_for(lambda: ids["long"] in worker.output(), 30, "the long task received")
        wait_for(
            lambda: f"Task logs.long[{ids['long']}] started" in worker.output(),
            30,
            "the long task running",
        )
        app.control.revoke(ids["long"], terminate=True)

        def seen(text: str) -> bool:
            return text in worker.output()

        for text in (
            f"Hard time limit (1s) exceeded for logs.sleep[{ids['hard']}]",
            f"Soft time limit (0.5s) exceeded for logs.soft_limit[{ids['soft']}]",
            f"Terminating {ids['long']} (",
        ):
            wait_for(lambda text=text: seen(text), 30, text)
        wait_for(
            lambda: (
                sum(
                    f"Task logs.add[{child.id}] succeeded" in worker.output()
                    for child in members.results
                )
                == 3
            ),
            30,
            "the group's members done",
        )
        wait_for(
            lambda: f"Task logs.total[{callback_id}] succeeded" in worker.output(),
            30,
            "the chord's callback done",
        )
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0

        stdout, stderr = json_lines(worker.output()), json_lines(worker.errors())
        records = stdout + stderr
        assert len(stdout) > 30
        assert stderr == []  # stdout is the default output: everything is there

        # The banner, as one record.
        [started] = [r for r in records if r.get("event", {}).get("action") == "worker-started"]
        assert started["message"] == f"worker {worker.hostname} started"
        about = started["celery"]
        assert about["worker"]["hostname"] == worker.hostname
        assert about["worker"]["pool"] == "prefork"
        assert about["worker"]["concurrency"] == {"processes": 2}
        assert about["worker"]["queues"] == [queue]
        assert about["worker"]["events"] is False
        assert {"logs.add", "logs.fail", "logs.long"} <= set(about["tasks"])
        # kombu masks the password (always, for Redis), and the formatter scrubs it again.
        transport = about["broker"]["transport"]
        assert transport.startswith("redis://:[REDACTED]@127.0.0.1:"), transport
        assert started["log.level"] == "info"

        # The shutdown notice Celery writes from its signal handler.
        notices = [r["message"] for r in records if r["log"]["logger"] == "celery.apps.worker"]
        assert notices == [f"{worker.hostname} ready.", "worker: Warm shutdown (MainProcess)"]

        # Every line naming a task carries it, whichever process wrote it.
        all_ids = {*ids.values(), *(child.id for child in members.results)}
        naming = 0
        for record in records:
            for task_id in all_ids:
                if task_id in record["message"]:
                    assert record.get("celery", {}).get("task", {}).get("id") == task_id, (
                        record["message"],
                        record["log"],
                    )
                    name = record["celery"]["task"].get("name", "")
                    assert name.startswith("logs."), (record["message"], record["log"])
                    naming += 1
        assert naming >= 25

        # The error line Celery writes after the hard limit names no task: it still has one.
        handler_errors = [r for r in records if r["message"].startswith("Task handler raised")]
        assert handler_errors
        assert {r["celery"]["task"]["id"] for r in handler_errors} == {ids["hard"]}

        # A chord's header members carry their group's id and their callback's.
        header = [
            r["celery"]["task"]
            for r in records
            if r.get("event", {}).get("action") == "task-started"
            and r["celery"]["task"].get("chord_callback_id") == callback_id
        ]
        assert [t["name"] for t in header] == ["logs.add", "logs.add"]
        assert len({t["group_id"] for t in header}) == 1

        # Group members carry the group's id.
        member_records = [
            r
            for r in records
            if r.get("event", {}).get("action") == "task-started"
            and r["celery"]["task"]["id"] in {child.id for child in members.results}
        ]
        assert len(member_records) == 3
        assert {r["celery"]["task"]["group_id"] for r in member_records} == {members.id}

        # The terminated task's revoked record says so.
        [revoked] = [
            r
            for r in records
            if r.get("event", {}).get("action") == "task-revoked"
            and r["celery"]["task"]["id"] == ids["long"]
        ]
        assert revoked["celery"]["task"]["terminated"] is True
    finally:
        worker.close()


def send_chord(broker: str, backend: str, queue: str) -> str:
    """Two logs.add into logs.total; the callback's id. The producer needs the backend too."""
    app = Celery("obs_chords", broker=broker, backend=backend, set_as_current=False)
    app.conf.task_default_queue = queue
    try:
        header = [app.signature("logs.add", (i, 10)) for i in range(2)]
        return str(chord(header)(app.signature("logs.total")).id)
    finally:
        app.close()


def started_worker(broker: str) -> SimpleNamespace:
    app = Celery("proj", broker=broker, backend="redis://:backend-pw@broker:6379/1")
    return SimpleNamespace(
        app=app,
        hostname="celery@w1",
        pool_cls="celery.concurrency.prefork:TaskPool",
        concurrency=None,
        autoscale=(8, 2),
        task_events=True,
        quiet=False,
    )


def test_the_started_record_masks_credentials_and_describes_autoscale() -> None:
    worker = started_worker("redis://user:broker-pw@broker:6379/0;redis://:pw2@other:6379/0")
    fields = console.started_fields(worker)
    text = json.dumps(fields)
    assert "broker-pw" not in text
    assert "backend-pw" not in text
    assert "pw2" not in text
    assert fields["celery"]["worker"]["pool"] == "prefork"
    assert fields["celery"]["worker"]["concurrency"] == {"min": 2, "max": 8}
    console.on_after_setup(instance=worker)
    assert worker.quiet is True  # Celery prints no banner


def test_a_result_backend_that_cannot_be_built_costs_only_its_field() -> None:
    worker = started_worker("redis://broker:6379/0")
    worker.app.conf.result_backend = "no-such-backend://x"  # its module cannot be imported
    fields = console.started_fields(worker)
    assert fields["celery"]["result_backend"] is None
    assert fields["celery"]["worker"]["hostname"] == "celery@w1"


def test_a_shutdown_notice_is_one_json_line_written_at_once(tmp_path) -> None:
    from celery_obs.log_shipping.formatter import EcsJsonFormatter

    path = tmp_path / "out"
    with path.open("w") as out:
        console.ConsoleNotices(EcsJsonFormatter(service_name="svc"))(
            "worker: Hitting Ctrl+C again will terminate all running tasks!", out
        )
    [record] = json_lines(path.read_text())
    assert record["message"] == "worker: Hitting Ctrl+C again will terminate all running tasks!"
    assert record["service"]["name"] == "svc"
    console.ConsoleNotices(EcsJsonFormatter())("nowhere to write", None)  # no stream: nothing


def test_the_handler_error_line_after_a_failure_names_the_failed_task() -> None:
    import logging

    from celery_obs.log_shipping import task_lines

    exc = TimeoutError("hard limit")
    task_lines.failed(exc, "t-9", "a.slow")

    def line(arg: object) -> logging.LogRecord:
        record = logging.LogRecord(
            "celery.worker.request",
            logging.ERROR,
            __file__,
            1,
            "Task handler raised error: %r",
            (arg,),
            None,
        )
        TaskContextFilter().filter(record)
        return record

    assert getattr(line(TimeoutError("another")), TASK_ATTR, None) is None  # not that one
    assert getattr(line(exc), TASK_ATTR) == {"id": "t-9", "name": "a.slow"}
    assert getattr(line(exc), TASK_ATTR, None) is None  # said once: not remembered forever


@pytest.mark.parametrize(
    ("msg", "args", "data", "expected"),
    [
        ("Task %(name)s[%(id)s] received", None, {"id": "t1", "name": "a.b"}, ("t1", "a.b")),
        ("Soft time limit (%ss) exceeded for %s[%s]", (1.5, "a.b", "t2"), None, ("t2", "a.b")),
        ("Discarding revoked task: %s[%s]", ("a.b", "t3"), None, ("t3", "a.b")),
        ("Task %s[%s] retry: %s", ("a.b", "t4", "Retry in 1s"), None, ("t4", "a.b")),
        ("Terminating %s (%s)", ("t5", 15), None, ("t5", None)),
        ("%d%% done, %s[%s]", (50, "a.b", "t6"), None, ("t6", "a.b")),
        ("Tasks flagged as revoked: %s", ("t7, t8",), None, None),
        ("Tasks flagged as revoked: %s", ("t9",), None, ("t9", None)),
        ("Connected to %s", ("redis://x",), None, None),
    ],
)
def test_celerys_lines_about_a_task_carry_its_id(msg, args, data, expected) -> None:
    import logging

    record = logging.LogRecord("celery.worker.strategy", logging.INFO, __file__, 1, msg, (), None)
    record.args = args
    if data is not None:
        record.data = data
    TaskContextFilter().filter(record)
    task = getattr(record, TASK_ATTR, None)
    if expected is None:
        assert task is None
    else:
        task_id, name = expected
        assert task == ({"id": task_id, "name": name} if name else {"id": task_id})
