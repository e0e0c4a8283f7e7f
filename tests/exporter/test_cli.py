"""Flags, environment and the demo, as a user meets them."""

from __future__ import annotations

import signal
import socket
import sys

import pytest

from celery_obs.cli import build_parser, main
from celery_obs.exporter.config import config_from_args, env_name
from celery_obs.exporter.metrics import BucketLayout

from support import Process, Scrape, free_port, http_get, run_exporter_cli, wait_for


def parse(argv: list[str], environ: dict[str, str] | None = None):
    return config_from_args(build_parser(environ or {}).parse_args(argv))


def test_defaults() -> None:
    config = parse(["exporter", "--broker-url", "redis://h:6379/0"])
    assert config.listen_address == ":9808"
    assert config.limits.worker_timeout == 10.0
    assert config.limits.worker_retention == 3600.0
    assert config.limits.buckets == BucketLayout()
    assert config.enable_events is True
    assert config.queues == ()
    assert config.transport_options == {}


def test_every_flag_from_the_environment() -> None:
    environ = {
        "CELERY_OBS_BROKER_URL": "amqp://u:p@h//",
        "CELERY_OBS_BROKER_TRANSPORT_OPTIONS": "visibility_timeout=3600 master_name=mymaster",
        "CELERY_OBS_WEB_LISTEN_ADDRESS": "127.0.0.1:9000",
        "CELERY_OBS_WEB_CONFIG_FILE": "/etc/web.yml",
        "CELERY_OBS_WORKER_TIMEOUT": "7.5",
        "CELERY_OBS_WORKER_RETENTION": "7200",
        "CELERY_OBS_QUEUES": "a, b",
        "CELERY_OBS_BUCKETS": "0.1,1,60",
        "CELERY_OBS_MAX_TASK_NAMES": "50",
        "CELERY_OBS_MAX_EXCEPTIONS": "20",
        "CELERY_OBS_MAX_QUEUES": "30",
        "CELERY_OBS_MAX_WORKERS": "40",
        "CELERY_OBS_MAX_TRACKED_TASKS": "1000",
        "CELERY_OBS_MAX_FINISHED_TASKS": "500",
        "CELERY_OBS_QUEUE_POLL_INTERVAL": "5",
        "CELERY_OBS_ENABLE_EVENTS": "false",
        "CELERY_OBS_ENABLE_EVENTS_INTERVAL": "9",
        "CELERY_OBS_EVENT_QUEUE_TTL": "11",
        "CELERY_OBS_EVENT_QUEUE_EXPIRES": "12",
        "CELERY_OBS_EVENT_QUEUE_MAX_LENGTH": "13",
        "CELERY_OBS_LOG_LEVEL": "DEBUG",
    }
    config = parse(["exporter"], environ)
    assert config.broker_url == "amqp://u:p@h//"
    assert config.transport_options == {"visibility_timeout": 3600, "master_name": "mymaster"}
    assert (config.listen_address, config.web_config_file) == ("127.0.0.1:9000", "/etc/web.yml")
    limits = config.limits
    assert (limits.worker_timeout, limits.worker_retention) == (7.5, 7200.0)
    assert (limits.max_task_names, limits.max_exceptions, limits.max_queues) == (50, 20, 30)
    assert (limits.max_workers, limits.max_tracked_tasks) == (40, 1000)
    assert limits.max_finished_tasks == 500
    assert limits.buckets == BucketLayout((0.1, 1.0, 60.0), (0.1, 1.0, 60.0), (0.1, 1.0, 60.0))
    assert config.queues == ("a", "b")
    assert (config.queue_poll_interval, config.enable_events_interval) == (5.0, 9.0)
    assert config.enable_events is False
    assert (config.event_queue.ttl, config.event_queue.expires) == (11.0, 12.0)
    assert config.event_queue.max_length == 13
    assert config.log_level == "debug"


def test_flags_beat_the_environment_and_celery_broker_url_is_the_fallback() -> None:
    environ = {"CELERY_BROKER_URL": "redis://fallback//", "CELERY_OBS_WORKER_TIMEOUT": "5"}
    config = parse(
        [
            "exporter",
            "--worker-timeout",
            "20",
            "--broker-transport-option",
            "a=1",
            "--broker-transport-option",
            "b=[0, 3]",
        ],
        environ,
    )
    assert config.broker_url == "redis://fallback//"
    assert config.limits.worker_timeout == 20.0
    assert config.transport_options == {"a": 1, "b": [0, 3]}
    preferred = parse(["exporter"], {**environ, "CELERY_OBS_BROKER_URL": "redis://ours//"})
    assert preferred.broker_url == "redis://ours//"


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (
            ["exporter"],
            {},
            "--broker-url (or CELERY_OBS_BROKER_URL / CELERY_BROKER_URL) is required",
        ),
        (["exporter", "--broker-url", "x", "--worker-timeout", "0"], {}, "must be a number > 0"),
        (["exporter", "--broker-url", "x", "--buckets", "5,1"], {}, "positive and increasing"),
        (["exporter", "--broker-url", "x", "--buckets", "1,5,inf"], {}, "+Inf is implied"),
        (["exporter", "--broker-url", "x", "--web.listen-address", "9808"], {}, "HOST:PORT"),
        (
            ["exporter", "--broker-url", "x", "--broker-transport-option", "novalue"],
            {},
            "key=value",
        ),
        (
            ["exporter", "--broker-url", "x"],
            {"CELERY_OBS_MAX_QUEUES": "lots"},
            "environment variable CELERY_OBS_MAX_QUEUES",
        ),
        (
            ["exporter", "--broker-url", "x", "--log-level", "loud"],
            {},
            "must be one of debug, info",
        ),
    ],
)
def test_bad_input_is_a_clear_usage_error(argv, environ, message, capsys) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv, environ)
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_help_names_every_flags_environment_variable(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["exporter", "--help"], {})
    text = " ".join(capsys.readouterr().out.split())
    for flag in (
        "--broker-url",
        "--web.listen-address",
        "--web.config.file",
        "--worker-timeout",
        "--queues",
        "--buckets",
        "--max-task-names",
        "--log-level",
    ):
        assert env_name(flag) in text, flag
    assert "CELERY_OBS_ENABLE_EVENTS" in text
    assert env_name("--web.listen-address") == "CELERY_OBS_WEB_LISTEN_ADDRESS"


def test_listen_address_in_use_is_a_clear_error() -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result = run_exporter_cli(
            "--broker-url", "memory://", "--web.listen-address", f"127.0.0.1:{port}"
        )
    assert result.returncode == 2
    assert f"celery-obs: cannot listen on 127.0.0.1:{port}:" in result.stderr


@pytest.mark.slow
def test_demo_serves_task_counters_and_stops_on_sigint() -> None:
    port = free_port()
    demo = Process(
        [
            sys.executable,
            "-m",
            "celery_obs",
            "demo",
            "--web.listen-address",
            f"127.0.0.1:{port}",
            "--tasks-per-second",
            "20",
        ]
    )
    try:
        wait_for(
            lambda: f"metrics at http://127.0.0.1:{port}/metrics" in demo.output(),
            30,
            "the demo printing where /metrics is",
        )

        def counting() -> Scrape | None:
            scrape = Scrape(http_get(f"http://127.0.0.1:{port}/metrics")[1])
            done = scrape.samples.get("celery_task_succeeded_total", {})
            return scrape if done and min(done.values()) > 0 else None

        scrape = wait_for(counting, 30, "non-zero task counters")
        names = {dict(labels)["name"] for labels in scrape.samples["celery_task_sent_total"]}
        assert names == {"demo.add", "demo.resize_image", "demo.charge_card", "demo.sync_inventory"}
        assert scrape.value("celery_exporter_broker_connected") == 1
        assert [v for k, v in scrape.samples["celery_worker_up"].items()] == [1.0]
        demo.signal(signal.SIGINT)
        assert demo.wait(20) == 0
    finally:
        demo.close()
