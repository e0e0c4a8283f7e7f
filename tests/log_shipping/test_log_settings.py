"""log_shipping settings: strict parsing (a typo is an error, never "off"), levels from code,
app.conf or the environment, and no credentials in names or messages."""

from __future__ import annotations

import logging

import pytest
from celery import Celery

from celery_obs.log_shipping.hooks import LogConfig, config_from_app, config_from_env
from celery_obs.log_shipping.outputs import split_outputs, spool_name
from celery_obs.log_shipping.sinks import HttpSink, TcpSink


def test_a_boolean_typo_is_an_error_not_off() -> None:
    with pytest.raises(ValueError, match="CELERY_OBS_LOG_VERIFY_CERTS"):
        config_from_env({"CELERY_OBS_LOG_VERIFY_CERTS": "ture"}, LogConfig())
    assert (
        config_from_env({"CELERY_OBS_LOG_VERIFY_CERTS": "off"}, LogConfig()).verify_certs is False
    )
    app = Celery("typo", set_as_current=False)
    app.conf.celery_obs_log_include_args = "yse"
    with pytest.raises(ValueError, match="celery_obs_log_include_args"):
        config_from_app(app, LogConfig())


def test_levels_by_name_or_number_and_none_leaves_the_workers_own() -> None:
    assert LogConfig().level is None  # `celery worker -l WARNING` stays WARNING
    app = Celery("levels", set_as_current=False)
    app.conf.celery_obs_log_level = logging.DEBUG
    assert config_from_app(app, LogConfig()).level == "DEBUG"
    assert config_from_env({"CELERY_OBS_LOG_LEVEL": "warning"}, LogConfig()).level == "WARNING"
    with pytest.raises(ValueError, match="CELERY_OBS_LOG_LEVEL"):
        config_from_env({"CELERY_OBS_LOG_LEVEL": "LOUD"}, LogConfig())


def test_spools_are_named_per_destination_and_data_stream_without_credentials() -> None:
    es = "elasticsearch+https://elastic:pw@es.example:9200"
    assert (
        spool_name(es, "logs-celery-prod") == "elasticsearch-https-es.example-9200-logs-celery-prod"
    )
    assert spool_name(es, "logs-celery-prod") != spool_name(es, "logs-celery-staging")
    assert spool_name("http://u:pw@logstash:8080/") == "http-logstash-8080"


def test_passwords_never_appear_in_errors() -> None:
    for bad, refuse in (
        ("htps://shipper:hunter2@logstash:8080/", split_outputs),
        ("ftp://shipper:hunter2@logstash:8080/", HttpSink),
        ("tcp://shipper:hunter2@logstash", TcpSink),
    ):
        with pytest.raises(ValueError, match="logstash") as error:
            refuse(bad)
        assert "hunter2" not in str(error.value)
        assert "shipper:***@logstash" in str(error.value)
