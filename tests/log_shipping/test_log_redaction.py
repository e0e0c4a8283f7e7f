"""Secrets never leave: a table of payload shapes, each logged through a real logger and the
ECS formatter (and task arguments through the lifecycle records), checked in the JSON that would
be shipped; then a real prefork worker given secret-laden tasks, checked in all it writes."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import uuid
from collections import defaultdict, namedtuple
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from celery_obs.log_shipping.formatter import EcsJsonFormatter
from celery_obs.log_shipping.lifecycle import Lifecycle
from celery_obs.log_shipping.redact import REDACTED, Redactor

from support import WorkerProcess, producer, wait_for

Login = namedtuple("Login", "user password")


@dataclasses.dataclass
class Account:
    name: str
    api_key: str


JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJqd3QtdGFibGUifQ.c2lnbmF0dXJlLWp3dA"
PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEpem-table-1\n-----END RSA PRIVATE KEY-----"


def _raise(exc: BaseException) -> None:
    raise exc


def log_exception(log: logging.Logger, exc: BaseException, message: str = "failed") -> None:
    try:
        _raise(exc)
    except BaseException:
        log.exception(message)


def log_chained(log: logging.Logger) -> None:
    try:
        try:
            _raise(ConnectionError("cannot reach amqp://svc:pw-cause-1@mq:5672//"))
        except ConnectionError as cause:
            raise RuntimeError("publish failed; Authorization: Bearer tok-chain-1") from cause
    except RuntimeError:
        log.exception("giving up")


def recursive() -> dict[str, Any]:
    d: dict[str, Any] = {"password": "pw-rec-1", "note": "kept-rec"}
    d["self"] = d
    return d


#: (shape, how it is logged, the secrets that must not appear, text that must stay)
SHAPES: list[tuple[str, Callable[[logging.Logger], None], list[str], list[str]]] = [
    (
        "URL with a password, as an argument",
        lambda log: log.info("connecting to %s", "postgres://app:pw-url-1@db:5432/orders"),
        ["pw-url-1"],
        ["postgres://app:", "@db:5432/orders"],
    ),
    (
        "URL with a token as its user",
        lambda log: log.info("cloning https://ghp-tok-url-2@github.com/o/r.git"),
        ["ghp-tok-url-2"],
        ["@github.com/o/r.git"],
    ),
    (
        "URL with only a password",
        lambda log: log.info("cache at %s", "redis://:pw-url-3@cache:6379/0"),
        ["pw-url-3"],
        ["@cache:6379/0"],
    ),
    (
        "pairs of headers in extra",
        lambda log: log.info("request", extra={"headers": [["Authorization", "Bearer tok-p-1"]]}),
        ["tok-p-1"],
        ["Authorization"],
    ),
    (
        "tuple of pairs with a hyphenated key",
        lambda log: log.info(
            "request", extra={"headers": (("X-Api-Key", "key-p-2"), ("Accept", "kept-accept"))}
        ),
        ["key-p-2"],
        ["kept-accept"],
    ),
    (
        "pairs as a positional argument of the message",
        lambda log: log.info("headers %s", [("Authorization", "Bearer tok-p-3")]),
        ["tok-p-3"],
        ["headers [("],
    ),
    (
        "password=... inside a string",
        lambda log: log.info("dsn is host=db password=pw-kv-1 user=kept-user"),
        ["pw-kv-1"],
        ["user=kept-user", "host=db"],
    ),
    (
        "a number formatted after a secret key",
        lambda log: log.info("login pin password=%d, attempt %d", 987654, 3),
        ["987654"],
        ["attempt 3"],
    ),
    (
        "key: value with a hyphenated key",
        lambda log: log.info("sent X-Api-Key: key-kv-2 upstream"),
        ["key-kv-2"],
        ["upstream"],
    ),
    (
        "query string",
        lambda log: log.info("GET /cb?code=1&access_token=tok-kv-3&state=kept-state"),
        ["tok-kv-3"],
        ["state=kept-state"],
    ),
    (
        "a dict's repr in the message",
        lambda log: log.info("kwargs %r", {"user": "kept-ann", "password": "pw-repr-1"}),
        ["pw-repr-1"],
        ["'user': 'kept-ann'"],
    ),
    (
        "JSON in the message, and JSON inside a JSON string",
        lambda log: log.info(
            "body %s then %s",
            json.dumps({"api_key": "key-json-1", "n": 1}),
            json.dumps(json.dumps({"token": "tok-json-2"})),
        ),
        ["key-json-1", "tok-json-2"],
        ['"n": 1'],
    ),
    (
        "cookie header",
        lambda log: log.info("Cookie: sessionid=ses-ck-1; theme=kept-dark"),
        ["ses-ck-1"],
        ["theme=kept-dark"],
    ),
    (
        "bearer token in prose, basic credentials, a JWT, a PEM key",
        lambda log: log.warning(
            "retrying with bearer tok-free-1; header Basic dXNlcjpwdy1iYXNpYw==; jwt %s; %s",
            JWT,
            PEM,
        ),
        ["tok-free-1", "dXNlcjpwdy1iYXNpYw", JWT, "MIIEpem-table-1"],
        ["retrying with bearer", "BEGIN RSA PRIVATE KEY"],
    ),
    (
        "extra keys in any case and separator",
        lambda log: log.info(
            "keys",
            extra={
                "X-Api-Key": "k-sep-1",
                "x_api_key": "k-sep-2",
                "api.key": "k-sep-3",
                "APIKEY": "k-sep-4",
                "Db-Password": "k-sep-5",
                "kept_field": "kept-sep",
            },
        ),
        ["k-sep-1", "k-sep-2", "k-sep-3", "k-sep-4", "k-sep-5"],
        ["kept-sep"],
    ),
    (
        "nested mappings, a namedtuple and a dataclass",
        lambda log: log.info(
            "nested",
            extra={
                "conn": {"opts": [{"secret_token": "k-nest-1"}]},
                "login": Login("kept-bob", "k-nest-2"),
                "account": Account("kept-acme", "k-nest-3"),
            },
        ),
        ["k-nest-1", "k-nest-2", "k-nest-3"],
        ["kept-bob", "kept-acme"],
    ),
    (
        "command line with a secret flag, bytes holding a secret",
        lambda log: log.info(
            "spawn",
            extra={"argv": ["prog", "--password", "pw-argv-1", "-v"], "raw": b"token=tok-b-1"},
        ),
        ["pw-argv-1", "tok-b-1"],
        ["-v"],
    ),
    (
        "exception message",
        lambda log: log_exception(log, ValueError("login failed password=pw-exc-1")),
        ["pw-exc-1"],
        ["login failed password="],
    ),
    (
        "chained exception: message and traceback",
        log_chained,
        ["pw-cause-1", "tok-chain-1"],
        ["amqp://svc:", "ConnectionError"],
    ),
    (
        "a dict as the message",
        lambda log: log.info({"event": "kept-login", "password": "pw-dict-1"}),
        ["pw-dict-1"],
        ["kept-login"],
    ),
    (
        "a recursive dict in extra",
        lambda log: log.info("cyclic", extra={"d": recursive()}),
        ["pw-rec-1"],
        ["kept-rec", "[circular]"],
    ),
    (
        "an object whose text holds a secret",
        lambda log: log.info("obj", extra={"obj": SimpleNamespace(url="https://u:pw-obj-1@h/")}),
        ["pw-obj-1"],
        ["https://u:"],
    ),
]


def texts(value: Any) -> str:
    """Every key and string value of a decoded record, one per line (JSON escapes undone)."""
    if isinstance(value, dict):
        return "\n".join(f"{k}\n{texts(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "\n".join(texts(v) for v in value)
    return str(value)


def formatted(log_it: Callable[[logging.Logger], None]) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(EcsJsonFormatter(service_name="svc", hostname="host-1"))
    logger = logging.getLogger(f"test.redact.{uuid.uuid4().hex}")
    logger.handlers = [handler]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    log_it(logger)
    return stream.getvalue()


@pytest.mark.parametrize(
    ("log_it", "secrets", "kept"), [row[1:] for row in SHAPES], ids=[row[0] for row in SHAPES]
)
def test_no_secret_shape_leaves_in_a_record(log_it, secrets, kept) -> None:
    raw = formatted(log_it)
    [record] = [json.loads(line) for line in raw.splitlines()]  # one record, never lost
    text = texts(record)
    for secret in secrets:
        assert secret not in raw
        assert secret not in text
    for part in kept:
        assert part in text
    assert REDACTED in text


def login(user, password, *rest, **options):  # a task function's signature
    return user


@pytest.mark.parametrize(
    ("args", "kwargs", "secrets", "kept"),
    [
        (("kept-ann", "pw-pos-1"), {}, ["pw-pos-1"], ["kept-ann"]),  # positional by name
        (("kept-ann",), {"password": "pw-kw-1"}, ["pw-kw-1"], ["kept-ann"]),
        ((), {"X-Api-Key": "key-kw-2", "x.api.key": "key-kw-3"}, ["key-kw-2", "key-kw-3"], []),
        (
            ("kept-ann", "x", "postgres://u:pw-pos-2@db/x", [["Authorization", "Bearer t-4"]]),
            {
                "headers": {"Cookie": "ses-5"},
                "note": "password=pw-kw-6",
                "pairs": [("X-Api-Key", "key-pair-7")],
            },
            ["pw-pos-2", "t-4", "ses-5", "pw-kw-6", "key-pair-7"],
            ["kept-ann", "postgres://u:"],
        ),
    ],
    ids=["positional", "keyword", "hyphen and dot keys", "values in args and kwargs"],
)
def test_task_arguments_are_redacted_by_name_and_by_value(args, kwargs, secrets, kept) -> None:
    task = SimpleNamespace(
        name="proj.login", run=login, request=SimpleNamespace(id="t-1", args=args, kwargs=kwargs)
    )
    lifecycle = Lifecycle(Redactor())

    def log_it(log: logging.Logger) -> None:
        lifecycle_logger = logging.getLogger("celery_obs.lifecycle")
        saved = lifecycle_logger.handlers, lifecycle_logger.propagate, lifecycle_logger.level
        lifecycle_logger.handlers, lifecycle_logger.propagate = log.handlers, False
        lifecycle_logger.setLevel(logging.INFO)
        try:
            lifecycle.on_prerun(sender=task, task_id="t-1", task=task)
            exc = PermissionError("denied: token=tok-exc-9")
            lifecycle.on_failure(sender=task, task_id="t-1", exception=exc)
            lifecycle.on_postrun(sender=task, task_id="t-1", task=task)
        finally:
            lifecycle_logger.handlers, lifecycle_logger.propagate = saved[:2]
            lifecycle_logger.setLevel(saved[2])

    raw = formatted(log_it)
    started, failed = [json.loads(line) for line in raw.splitlines()]
    assert started["event"]["action"] == "task-started"
    assert failed["event"]["action"] == "task-failed"
    text = texts([started, failed])
    for secret in [*secrets, "tok-exc-9"]:
        assert secret not in raw
        assert secret not in text
    for part in kept:
        assert part in text


def test_keys_match_case_insensitively_with_any_separator() -> None:
    redact = Redactor()
    for key in ("X-Api-Key", "x_api_key", "api.key", "APIKEY", "Api Key", "x-auth-token"):
        assert redact.sensitive(key), key
    for key in ("user", "api", "key", "monkey_count"):
        assert not redact.sensitive(key), key
    assert Redactor(["card"])({"credit-card": "4111", "password": "p"}) == {
        "credit-card": REDACTED,
        "password": "p",  # custom patterns replace the defaults (value shapes stay)
    }


@pytest.mark.broker
def test_a_real_worker_writes_no_secret_it_was_given(redis_url, queue) -> None:
    worker = WorkerProcess(
        redis_url, queue, f"secrets-{uuid.uuid4().hex[:6]}", events=False, app="logging_app"
    )
    secrets = [f"pw-w-{i}" for i in range(1, 8)]
    try:
        wait_for(lambda: "ready" in worker.output(), 30, "the worker ready")
        app = producer(redis_url, queue)
        ids = [
            # succeeds: Celery logs the return value, the lifecycle logs the arguments
            app.send_task("logs.add", ("postgres://app:pw-w-1@db/x", "?token=pw-w-2")).id,
            app.send_task("logs.add", ([["Authorization", "Bearer pw-w-3"]], []), {}).id,
            app.send_task("logs.add", (1, 2, "pw-w-4")).id,  # positional `password`
            # fail: Celery logs the exception and its traceback
            app.send_task("logs.add", (1, "password=pw-w-5")).id,
            app.send_task("logs.add", (), {"x": 1, "y": 2, "X-Api-Key": "pw-w-6"}).id,
            app.send_task("logs.add", ("a",), {"y": "b", "password": "pw-w-7"}).id,
        ]

        def finished() -> dict[str, list[str]]:
            steps: dict[str, list[str]] = defaultdict(list)
            for line in worker.output().splitlines():
                record = json.loads(line) if line.startswith("{") else {}
                if record.get("log", {}).get("logger") == "celery_obs.lifecycle":
                    steps[record["celery"]["task"]["id"]].append(record["event"]["action"])
            return {i: steps[i] for i in ids if len(steps[i]) == 2}

        wait_for(lambda: len(finished()) == len(ids), 30, "every task finished")
        output = worker.output()
        assert [finished()[i][1] for i in ids] == ["task-succeeded"] * 3 + ["task-failed"] * 2 + [
            "task-succeeded"
        ]
        assert "raised unexpected" in output  # Celery's own failure lines are there...
        for secret in secrets:
            assert secret not in output  # ...and no secret is, anywhere
        assert output.count(REDACTED) >= len(secrets)
    finally:
        worker.close()
