"""One settings mechanism for every command line and for log_shipping: flags beat the
environment, which beats the default; bad values are usage errors naming their source."""

from __future__ import annotations

import argparse

import pytest

from celery_obs.settings import (
    Setting,
    SettingError,
    SettingTable,
    csv,
    key_value,
    parse_bool,
    positive,
)

TABLE = SettingTable(
    (
        Setting("url", "Where.", None, flag="--url", env=("APP_URL", "FALLBACK_URL")),
        Setting("count", "How many.", 3, positive(int), flag="--count", env=("APP_COUNT",)),
        Setting("verify", "Check.", True, parse_bool, flag="--verify", negatable=True),
        Setting("names", "Which.", (), csv, flag="--names"),
        Setting("opt", "Repeat.", (), key_value, flag="--opt", env=("APP_OPTS",), repeated=True),
        Setting("token", "Secret.", None, flag="--token", secret=True, exclusive="auth"),
        Setting("user", "Who.", None, flag="--user", exclusive="auth"),
        Setting("conf_only", "No flag.", None, env=("APP_CONF_ONLY",)),
    )
)


def parse(argv: list[str], environ: dict[str, str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="t")
    TABLE.add_arguments(parser, environ)
    return parser.parse_args(argv)


def test_a_flag_beats_the_environment_which_beats_the_default() -> None:
    assert parse([], {}).count == 3
    assert parse([], {"APP_COUNT": "5"}).count == 5
    assert parse(["--count", "7"], {"APP_COUNT": "5"}).count == 7
    # The first variable set wins; empty ones do not count.
    assert parse([], {"APP_URL": "", "FALLBACK_URL": "b"}).url == "b"
    assert parse([], {"APP_URL": "a", "FALLBACK_URL": "b"}).url == "a"


def test_repeated_flags_and_space_separated_environment() -> None:
    assert parse([], {"APP_OPTS": "a=1 b=x"}).opt == [("a", 1), ("b", "x")]
    assert parse(["--opt", "c=[1]"], {}).opt == [("c", [1])]
    assert parse(["--names", "q1, q2,"], {}).names == ("q1", "q2")


def test_bad_values_are_usage_errors_naming_their_source(capsys) -> None:
    with pytest.raises(SystemExit):
        parse(["--count", "0"], {})
    assert "argument --count: must be a number > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse([], {"APP_COUNT": "many"})
    assert "environment variable APP_COUNT='many'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["--token", "t", "--user", "u"], {})
    assert "not allowed with argument" in capsys.readouterr().err


def test_one_bool_parser_where_a_typo_is_never_off() -> None:
    assert [parse_bool(w) for w in ("1", "True", " yes", "ON")] == [True] * 4
    assert [parse_bool(w) for w in ("0", "false", "No", "off")] == [False] * 4
    with pytest.raises(ValueError, match="got 'ture'"):
        parse_bool("ture")
    assert parse(["--no-verify"], {}).verify is False
    with pytest.raises(SettingError, match="APP_X"):
        SettingTable((Setting("x", "X.", False, parse_bool, env=("APP_X",)),)).from_environ(
            {"APP_X": "nope"}
        )


def test_the_docs_table_is_the_tables_rendering() -> None:
    assert TABLE.markdown(("flag", "environment", "default", "meaning")).splitlines()[:6] == [
        "| flag | environment | default | meaning |",
        "|---|---|---|---|",
        "| `--url` | `APP_URL`, `FALLBACK_URL` | `none` | Where. |",
        "| `--count` | `APP_COUNT` | `3` | How many. |",
        "| `--verify` / `--no-verify` | — | `on` | Check. |",
        "| `--names` | — | `none` | Which. |",
    ]
    table = TABLE.markdown(("name", "environment", "default", "meaning"))
    assert "| `token` | — | — | Secret. |" in table  # secrets show no default
    assert "| `conf_only` | `APP_CONF_ONLY` | `none` | No flag. |" in table
