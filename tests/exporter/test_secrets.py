"""Broker credentials never appear in what the exporter shows: URL masking for every form Celery
and kombu accept, and scrubbing of the secrets themselves from any text."""

from __future__ import annotations

import logging

import pytest

from celery_obs.exporter.secrets import Scrubber, ScrubFilter, mask_url, option_secrets, url_secrets


@pytest.mark.parametrize(
    ("url", "shown", "secrets"),
    [
        ("redis://:pw-one@h:6379/0", "redis://:**@h:6379/0", {"pw-one"}),
        (
            "redis://:pw-one@h1:6379/0;redis://:pw-two@h2:6379/0",
            "redis://:**@h1:6379/0;redis://:**@h2:6379/0",
            {"pw-one", "pw-two"},
        ),
        (
            "sentinel://:s1-secret@h1:26379;sentinel://:s2-secret@h2:26379",
            "sentinel://:**@h1:26379;sentinel://:**@h2:26379",
            {"s1-secret", "s2-secret"},
        ),
        (  # a password holding kombu's failover separator
            "amqp://user:half;other-half@h2:5672//",
            "amqp://user:**;**",
            {"half", "other-half"},
        ),
        ("amqps://user:p%40ss%2Fw@h:5671/v", "amqps://user:**@h:5671/v", {"p%40ss%2Fw", "p@ss/w"}),
        ("amqp://user:p@ss/word@h/vhost", "amqp://user:**@h/vhost", {"p@ss/word"}),
        ("sqs://AKIAEXAMPLE:sec%2Fret@", "sqs://AKIAEXAMPLE:**@", {"sec%2Fret", "sec/ret"}),
        (
            "redis+socket:///run/redis.sock?password=sock-pw&virtual_host=2",
            "redis+socket:///run/redis.sock?password=**&virtual_host=2",
            {"sock-pw"},
        ),
        (
            "rediss://:tls-pw@h:6380/0?ssl_cert_reqs=required",
            "rediss://:tls-pw@h:6380/0?ssl_cert_reqs=required".replace("tls-pw", "**"),
            {"tls-pw"},
        ),
        ("redis://user-only@h/0", "redis://user-only@h/0", set()),
        (  # a '?' in the credentials: what follows it looks like a query string
            "redis://u?pw=half@h:6379/0",
            "redis://u?**",
            {"pw=half"},
        ),
        ("memory://", "memory://", set()),
        ("amqp://u:pw-ipv6@[::1:5672/x", "amqp://u:**@[::1:5672/x", {"pw-ipv6"}),
        ("amqp://u:pw@[::1]:5672/x", "amqp://u:**@[::1]:5672/x", {"pw"}),
    ],
)
def test_every_url_form_is_shown_masked(url: str, shown: str, secrets: set[str]) -> None:
    assert mask_url(url) == shown
    assert url_secrets(url) == secrets
    for secret in secrets:
        assert secret not in mask_url(url)


def test_secret_transport_options_are_found_at_any_depth() -> None:
    options = {
        "master_name": "mymaster",
        "sentinel_kwargs": {"password": "sentinel-pw", "socket_timeout": 1},
        "ssl": {"keyfile_password": "key-pw"},
        "tokens": ["tok-1", "tok-2"],
    }
    assert option_secrets(options) == {"sentinel-pw", "key-pw", "tok-1", "tok-2"}


def test_the_scrubber_masks_secrets_in_text_and_in_log_records() -> None:
    scrub = Scrubber({"hunter22", "s3cret/pw", "ab"})  # "ab": too short to scrub from text
    assert scrub("login hunter22 failed for s3cret/pw; ab") == "login ** failed for **; ab"
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "pw=%s", ("hunter22",), None)
    ScrubFilter(scrub).filter(record)
    assert record.getMessage() == "pw=**"
