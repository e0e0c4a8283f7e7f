"""log_shipping: ECS JSON through real loggers, and a real prefork worker with install()."""

from __future__ import annotations

import io
import json
import logging
import signal
import uuid
from collections import Counter, defaultdict

import pytest
from celery import Celery

from celery_obs.log_shipping.formatter import EcsJsonFormatter
from celery_obs.log_shipping.hooks import LogConfig, config_from_app, config_from_env
from celery_obs.log_shipping.outputs import make_local_handler, split_outputs, spool_name
from celery_obs.log_shipping.redact import REDACTED, Redactor

from support import WorkerProcess, producer, wait_for


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture
def logged():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(EcsJsonFormatter(service_name="svc", hostname="host-1"))
    logger = logging.getLogger(f"test.ecs.{uuid.uuid4().hex}")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    return logger, stream


def test_ecs_fields_and_their_order(logged) -> None:
    logger, stream = logged
    logger.info("hello %s", "world", extra={"ecs": {"event": {"action": "x"}, "labels": {"a": 1}}})
    [record] = json_lines(stream.getvalue())
    assert list(record)[:4] == ["@timestamp", "log.level", "message", "ecs.version"]
    assert record["message"] == "hello world"
    assert record["log.level"] == "info"
    assert record["@timestamp"].endswith("Z")
    assert len(record["@timestamp"]) == 24
    assert record["log"]["logger"] == logger.name
    assert record["service"] == {"name": "svc"}
    assert record["host"] == {"hostname": "host-1"}
    assert record["process"]["pid"] > 0
    assert record["event"] == {"action": "x"}
    assert record["labels"] == {"a": 1}


def test_exceptions_become_error_fields(logged) -> None:
    logger, stream = logged
    try:
        raise KeyError("missing")
    except KeyError:
        logger.exception("lookup failed")
    [record] = json_lines(stream.getvalue())
    assert record["log.level"] == "error"
    assert record["error"]["type"] == "KeyError"
    assert record["error"]["message"] == "'missing'"
    assert "Traceback" in record["error"]["stack_trace"]
    assert "exc_info" not in record


def test_redaction_and_truncation() -> None:
    redact = Redactor(max_length=10)
    value = {
        "user": "ann",
        "Password": "x",
        "nested": {"api_key": "k", "list": ["a" * 25]},
        "Authorization": "Bearer t",
        "count": 3,
    }
    assert redact(value) == {
        "user": "ann",
        "Password": REDACTED,
        "count": 3,
        "Authorization": REDACTED,
        "nested": {"api_key": REDACTED, "list": ["aaaaaaaaaa...[15 more chars]"]},
    }
    assert redact([1, None, 2.5, object.__name__]) == [1, None, 2.5, "object"]
    assert Redactor(["card"])({"credit_card": "4111", "password": "p"}) == {
        "credit_card": REDACTED,
        "password": "p",
    }


def test_environment_overrides_code(tmp_path) -> None:
    base = LogConfig(service_name="from-code", output="stdout")
    path = tmp_path / "worker.log"
    config = config_from_env(
        {
            "CELERY_OBS_LOG_SERVICE_NAME": "from-env",
            "CELERY_OBS_LOG_OUTPUT": f"file:{path}",
            "CELERY_OBS_LOG_INCLUDE_ARGS": "true",
            "CELERY_OBS_LOG_REDACT": "pin, cvv",
        },
        base,
    )
    assert (config.service_name, config.include_args, config.redact) == (
        "from-env",
        True,
        ("pin", "cvv"),
    )
    handler = make_local_handler(config.output, config)
    handler.setFormatter(EcsJsonFormatter(service_name=config.service_name))
    handler.emit(logging.LogRecord("x", logging.INFO, __file__, 1, "to a file", None, None))
    handler.close()
    assert json_lines(path.read_text())[0]["message"] == "to a file"
    with pytest.raises(ValueError, match="stdout, stderr, file:PATH"):
        split_outputs("stdout,syslog")
    with pytest.raises(ValueError, match="CELERY_OBS_LOG_FLUSH_INTERVAL"):
        config_from_env({"CELERY_OBS_LOG_FLUSH_INTERVAL": "soon"}, base)


def test_settings_precedence_code_then_app_conf_then_environment() -> None:
    app = Celery("precedence", set_as_current=False)
    app.conf.update(
        celery_obs_log_output="stdout,http://logstash:8080/",
        celery_obs_log_include_args="yes",
        celery_obs_log_redact=["pin"],
        celery_obs_log_spool_max_mb=16,
    )
    code = LogConfig(service_name="from-code", output="stderr", max_value_length=10)
    config = config_from_env({"CELERY_OBS_LOG_SPOOL_MAX_MB": "32"}, config_from_app(app, code))
    assert (config.service_name, config.output, config.max_value_length) == (
        "from-code",
        "stdout,http://logstash:8080/",
        10,
    )
    assert (config.include_args, config.redact, config.spool_max_mb) == (True, ("pin",), 32)
    assert split_outputs(config.output) == ["stdout", "http://logstash:8080/"]
    # Spool directories are named after the destination, never its credentials.
    assert spool_name("https://user:pw@logs.example:8443/celery") == (
        "https-logs.example-8443-celery"
    )


@pytest.mark.broker
@pytest.mark.parametrize("hijack", ["1", "0"], ids=["hijack-root", "no-hijack"])
def test_real_prefork_worker_logs_every_step_as_json(redis_url, queue, hijack) -> None:
    worker = WorkerProcess(
        redis_url,
        queue,
        f"logs-{uuid.uuid4().hex[:6]}",
        events=False,
        app="logging_app",
        env={"OBS_TEST_HIJACK": hijack},
        quiet=True,
    )
    try:
        wait_for(lambda: "ready" in worker.output(), 30, "the worker ready")
        app = producer(redis_url, queue)
        ids = {
            "add": app.send_task("logs.add", (1, 2), {"password": "hunter2"}).id,
            "fail": app.send_task("logs.fail").id,
            "retry": app.send_task("logs.retry_once").id,
            "sleep": app.send_task("logs.sleep", (30,)).id,
            "unknown": app.send_task("logs.no_such_task").id,
        }
        eta = app.send_task("logs.add", (3, 4), countdown=2)
        wait_for(lambda: eta.id in worker.output(), 30, "the countdown task received")
        app.control.revoke(eta.id)
        ids["revoked"] = eta.id

        def actions() -> dict[str, list[str]]:
            by_task: dict[str, list[str]] = defaultdict(list)
            for record in json_lines(worker.output()):
                if record.get("log", {}).get("logger") == "celery_obs.lifecycle":
                    by_task[record["celery"]["task"]["id"]].append(record["event"]["action"])
            return by_task

        expected = {
            ids["add"]: ["task-started", "task-succeeded"],
            ids["fail"]: ["task-started", "task-failed"],
            ids["retry"]: ["task-started", "task-retried", "task-started", "task-succeeded"],
            ids["sleep"]: ["task-started", "task-failed"],  # once, though Celery reports twice
            ids["unknown"]: ["task-unknown"],
            ids["revoked"]: ["task-revoked"],
        }
        wait_for(
            lambda: {k: v for k, v in actions().items() if k in expected} == expected,
            30,
            "every lifecycle record",
        )
        records = json_lines(worker.output())  # every line parses: nothing but JSON
        # Celery's own "received" line is the task-received record: one per message.
        received = Counter(
            r["celery"]["task"]["id"]
            for r in records
            if r.get("event", {}).get("action") == "task-received"
            and r["log"]["logger"] == "celery.worker.strategy"
        )
        assert {key: received[task_id] for key, task_id in ids.items()} == {
            "add": 1,
            "fail": 1,
            "retry": 2,  # each attempt is a message of its own
            "sleep": 1,
            "unknown": 0,  # Celery sends task_unknown instead
            "revoked": 1,
        }
        by_action = {
            (r["celery"]["task"]["id"], r["event"]["action"]): r
            for r in records
            if "event" in r and "task" in r.get("celery", {})
        }

        done = by_action[(ids["add"], "task-succeeded")]
        assert done["event"]["outcome"] == "success"
        assert done["event"]["duration"] > 0
        assert done["celery"]["task"]["state"] == "SUCCESS"
        assert done["celery"]["task"]["queue"] == queue
        assert done["celery"]["task"]["kwargs"] == {"password": "[REDACTED]"}
        assert done["celery"]["task"]["args"] == [1, 2]
        assert done["service"]["name"] == "obs-test"
        assert "hunter2" not in worker.output()

        failed = by_action[(ids["fail"], "task-failed")]
        assert (failed["log.level"], failed["error"]["type"]) == ("error", "ValueError")
        assert failed["event"]["outcome"] == "failure"
        limit = by_action[(ids["sleep"], "task-failed")]
        assert limit["error"]["type"] == "TimeLimitExceeded"
        # Reported by the main process, which did not see it start: it ran for its limit.
        assert limit["celery"]["task"]["runtime"] == 1.0
        assert limit["event"]["duration"] == 1_000_000_000
        # The retried attempt was sent from inside the first: still not its own parent.
        retried = by_action[(ids["retry"], "task-succeeded")]["celery"]["task"]
        assert retried["retries"] == 1
        assert "parent_id" not in retried
        assert by_action[(ids["unknown"], "task-unknown")]["celery"]["task"]["name"] == (
            "logs.no_such_task"
        )
        assert by_action[(ids["revoked"], "task-revoked")]["process"]["name"] == "MainProcess"

        # Lines written while a task runs carry it: task logger, plain logging, print.
        inside = [
            r
            for r in records
            if r["message"]
            in ("adding 1 and 2", "plain logging inside a task", "printed inside a task")
        ]
        assert len(inside) == 3
        assert all(r["celery"]["task"] == {"id": ids["add"], "name": "logs.add"} for r in inside)
        # Celery's own lines are JSON too.
        assert any(r["log"]["logger"].startswith("celery.") and "celery" not in r for r in records)
        worker.signal(signal.SIGTERM)
        assert worker.wait(20) == 0
    finally:
        worker.close()


@pytest.mark.broker
@pytest.mark.parametrize("pool", ["threads", "solo"])
def test_threads_and_solo_pools_log_the_same_records(redis_url, queue, pool) -> None:
    worker = WorkerProcess(
        redis_url,
        queue,
        f"logs-{pool}-{uuid.uuid4().hex[:6]}",
        "-P",  # after WorkerProcess' own "-P prefork": the last one wins
        pool,
        events=False,
        app="logging_app",
        quiet=True,
    )
    try:
        wait_for(lambda: "ready" in worker.output(), 30, "the worker ready")
        app = producer(redis_url, queue)
        ok, bad = app.send_task("logs.add", (1, 2)).id, app.send_task("logs.fail").id

        def steps() -> dict[str, list[str]]:
            by_task: dict[str, list[str]] = defaultdict(list)
            for record in json_lines(worker.output()):
                if record.get("log", {}).get("logger") == "celery_obs.lifecycle":
                    by_task[record["celery"]["task"]["id"]].append(record["event"]["action"])
            return by_task

        expected = {ok: ["task-started", "task-succeeded"], bad: ["task-started", "task-failed"]}
        wait_for(lambda: {k: steps()[k] for k in expected} == expected, 30, "lifecycle records")
        inside = [r for r in json_lines(worker.output()) if r["message"] == "adding 1 and 2"]
        assert [r["celery"]["task"] for r in inside] == [{"id": ok, "name": "logs.add"}]
        assert inside[0]["process"]["name"] == "MainProcess"  # not a prefork pool child
    finally:
        worker.close()


# -- review fixes: serialisation fallback, extra fields, redactor shapes, nested task context --


def test_values_orjson_cannot_write_do_not_lose_the_record(logged) -> None:
    from pythonjsonlogger.orjson import OrjsonFormatter

    logger, stream = logged
    assert isinstance(logger.handlers[0].formatter, OrjsonFormatter)  # the fast path is in use
    labels = {"big": 2**70, "small": -(2**64), "ok": 7, "nan": float("nan"), "bad": "x\udc80y"}
    logger.info("big values %s", "here", extra={"ecs": {"labels": labels, "list": [2**64, 1]}})
    logger.info("next line")
    first, second = json_lines(stream.getvalue())
    assert first["message"] == "big values here"
    assert list(first)[:4] == ["@timestamp", "log.level", "message", "ecs.version"]
    assert first["labels"] == {
        "big": "1180591620717411303424",
        "small": "-18446744073709551616",
        "ok": 7,
        "nan": None,
        "bad": "x\udc80y",
    }
    assert first["list"] == ["18446744073709551616", 1]
    assert first["service"] == {"name": "svc"}
    assert second["message"] == "next line"


def test_extra_fields_are_kept_and_ecs_fields_win(logged) -> None:
    from celery_obs.log_shipping.context import TaskContextFilter, current_task

    logger, stream = logged
    logger.handlers[0].addFilter(TaskContextFilter())
    token = current_task.set({"id": "t-1", "name": "proj.task"})
    labels = {"a": 1, "b": 2}
    try:
        logger.info(
            "with extras",
            extra={
                "user_id": 5,
                "labels": labels,
                "celery": {"worker": {"hostname": "w1"}},
                "ecs": {"labels": {"b": 3}, "event": {"action": "x"}},
            },
        )
    finally:
        current_task.reset(token)
    [record] = json_lines(stream.getvalue())
    assert set(record) == {
        "@timestamp",
        "log.level",
        "message",
        "ecs.version",
        "log",
        "service",
        "host",
        "process",
        "user_id",
        "labels",
        "celery",
        "event",
    }
    assert record["user_id"] == 5
    assert record["labels"] == {"a": 1, "b": 3}
    assert labels == {"a": 1, "b": 2}  # the caller's dict is left as it was
    assert record["celery"] == {
        "worker": {"hostname": "w1"},
        "task": {"id": "t-1", "name": "proj.task"},
    }
    assert record["event"] == {"action": "x"}


def test_stack_info_becomes_error_stack_trace(logged) -> None:
    logger, stream = logged
    logger.info("where am I", stack_info=True)
    try:
        raise KeyError("missing")
    except KeyError:
        logger.exception("failed", stack_info=True)
    plain, failed = json_lines(stream.getvalue())
    assert set(plain) == {
        "@timestamp",
        "log.level",
        "message",
        "ecs.version",
        "log",
        "service",
        "host",
        "process",
        "error",
    }
    assert list(plain["error"]) == ["stack_trace"]
    assert plain["error"]["stack_trace"].startswith("Stack (most recent call last):\n")
    assert "test_stack_info_becomes_error_stack_trace" in plain["error"]["stack_trace"]
    assert "stack_info" not in failed
    assert failed["error"]["type"] == "KeyError"
    assert failed["error"]["stack_trace"].startswith("Traceback (most recent call last):\n")


def test_celerys_own_data_extra_is_never_shipped() -> None:
    """Celery logs its messages' context, task arguments' repr included, as extra "data"."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(EcsJsonFormatter(service_name="svc", hostname="host-1"))
    loggers = [logging.getLogger(f"{base}.{uuid.uuid4().hex}") for base in ("celery", "app")]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
        lg.propagate = False
    context = {"id": "t-1", "name": "proj.login", "kwargs": "{'password': 'hunter2'}"}
    loggers[0].info("Task %(name)s[%(id)s] received", context, extra={"data": context})
    loggers[1].info("Task %(name)s[%(id)s] seen", context, extra={"data": context})
    loggers[1].info("user data", extra={"data": {"rows": 3}})
    received, seen, user = json_lines(stream.getvalue())
    assert received["message"] == "Task proj.login[t-1] received"
    assert seen["message"] == "Task proj.login[t-1] seen"
    assert "data" not in received
    assert "data" not in seen
    assert "hunter2" not in stream.getvalue()
    assert user["data"] == {"rows": 3}


def test_redactor_walks_every_mapping_shape_and_caps_what_it_keeps() -> None:
    import dataclasses
    from collections import OrderedDict, namedtuple
    from types import MappingProxyType

    Login = namedtuple("Login", "user password")

    @dataclasses.dataclass
    class Account:
        name: str
        api_key: str
        login: Login

    redact = Redactor(max_length=10)
    assert redact(MappingProxyType({"user": "ann", "password": "p"})) == {
        "user": "ann",
        "password": REDACTED,
    }
    assert redact(OrderedDict(token="t", n=1)) == {"token": REDACTED, "n": 1}
    assert redact(Login("ann", "hunter2")) == {"user": "ann", "password": REDACTED}
    assert redact([Account("acme", "k", Login("bob", "pw"))]) == [
        {"name": "acme", "api_key": REDACTED, "login": {"user": "bob", "password": REDACTED}}
    ]
    assert redact(b"abc") == "b'abc'"
    assert redact(b"\x00" * 100_000) == "b'\\x00\\x00...[100000 bytes]"
    assert redact(bytearray(b"xyzxyzxyzxyz")) == "b'xyzxyzxy...[12 bytes]"
    assert redact(list(range(100_000))) == [*range(50), "[... 99950 more items]"]
    assert redact({str(i): i for i in range(51)})["[...]"] == "[... 1 more items]"
    assert redact([2**70, -(2**63), 2**63]) == [
        "1180591620...[12 more chars]",
        -(2**63),
        "9223372036...[9 more chars]",
    ]
    assert Redactor()(2**70) == "1180591620717411303424"
    assert Redactor(max_length=20)(10**5000) == "[16610-bit int]"
    redact = Redactor(max_length=10, max_items=3)
    assert redact(list(range(100_000))) == [0, 1, 2, "[... 99997 more items]"]
    assert redact(tuple(range(3))) == [0, 1, 2]
    assert redact({f"k{i}": i for i in range(5)}) == {
        "k0": 0,
        "k1": 1,
        "k2": 2,
        "[...]": "[... 2 more items]",
    }


def test_lifecycle_logs_big_int_arguments_as_strings(logged) -> None:
    from types import SimpleNamespace

    from celery_obs.log_shipping.lifecycle import Lifecycle

    logger, stream = logged
    lifecycle_logger = logging.getLogger("celery_obs.lifecycle")
    saved = lifecycle_logger.level, lifecycle_logger.propagate
    lifecycle_logger.addHandler(logger.handlers[0])
    lifecycle_logger.setLevel(logging.INFO)
    lifecycle_logger.propagate = False
    request = SimpleNamespace(id="t-big", args=(2**70, 1), kwargs={"n": 2**64})
    task = SimpleNamespace(name="proj.big", request=request)
    try:
        lifecycle = Lifecycle(Redactor())
        lifecycle.on_prerun(sender=task, task_id="t-big", task=task)
        lifecycle.on_postrun(sender=task, task_id="t-big", task=task)
    finally:
        lifecycle_logger.removeHandler(logger.handlers[0])
        lifecycle_logger.setLevel(saved[0])
        lifecycle_logger.propagate = saved[1]
    [started] = json_lines(stream.getvalue())
    assert started["celery"]["task"]["args"] == ["1180591620717411303424", 1]
    assert started["celery"]["task"]["kwargs"] == {"n": "18446744073709551616"}


def test_postrun_restores_the_outer_tasks_context() -> None:
    from types import SimpleNamespace

    from celery_obs.log_shipping.context import current_task
    from celery_obs.log_shipping.lifecycle import Lifecycle

    lifecycle = Lifecycle(None)
    outer, inner = SimpleNamespace(name="proj.outer"), SimpleNamespace(name="proj.inner")
    lifecycle.on_prerun(sender=outer, task_id="o-1", task=outer)
    lifecycle.on_prerun(sender=inner, task_id="i-1", task=inner)
    assert current_task.get() == {"id": "i-1", "name": "proj.inner"}
    lifecycle.on_postrun(sender=inner, task_id="i-1", task=inner)
    assert current_task.get() == {"id": "o-1", "name": "proj.outer"}
    lifecycle.on_postrun(sender=outer, task_id="o-1", task=outer)
    assert current_task.get() is None
    lifecycle.on_prerun(sender=outer, task_id="o-2", task=outer)
    lifecycle.on_postrun(sender=outer, task_id="never-started", task=outer)  # no token: cleared
    assert current_task.get() is None


def test_a_task_applied_eagerly_inside_another_keeps_the_outer_context(logged) -> None:
    from celery import signals

    from celery_obs.log_shipping.context import TaskContextFilter
    from celery_obs.log_shipping.lifecycle import Lifecycle

    logger, stream = logged
    logger.handlers[0].addFilter(TaskContextFilter())
    app = Celery("eager", set_as_current=False)

    @app.task(name="eager.inner")
    def inner() -> int:
        logger.info("in inner")
        return 1

    @app.task(name="eager.outer")
    def outer() -> int:
        logger.info("outer before")
        value = inner.apply(task_id="inner-1").get()
        logger.info("outer after")
        return value + 1

    lifecycle = Lifecycle(None)
    handlers = [(signals.task_prerun, lifecycle.on_prerun)]
    handlers.append((signals.task_postrun, lifecycle.on_postrun))
    for signal_, handler in handlers:
        signal_.connect(handler, weak=False)
    try:
        assert outer.apply(task_id="outer-1").get() == 2
    finally:
        for signal_, handler in handlers:
            signal_.disconnect(handler)
    logger.info("after both")
    tasks = {r["message"]: r.get("celery", {}).get("task") for r in json_lines(stream.getvalue())}
    assert tasks == {
        "outer before": {"id": "outer-1", "name": "eager.outer"},
        "in inner": {"id": "inner-1", "name": "eager.inner"},
        "outer after": {"id": "outer-1", "name": "eager.outer"},
        "after both": None,
    }
