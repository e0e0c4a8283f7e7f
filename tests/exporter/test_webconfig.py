"""A bad web config is refused at startup with its file, key and problem; a good one loads."""

from __future__ import annotations

from pathlib import Path

import bcrypt
import pytest

from celery_obs.exporter.webconfig import MAX_FILE_BYTES, WebConfigError, load_web_config

from support import free_port, run_exporter_cli

GOOD = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()  # $2b$04$ + 53 characters
BILLION_LAUGHS = (
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    + "".join(
        f"{chr(c)}: &{chr(c)} [{', '.join(['*' + chr(c - 1)] * 9)}]\n"
        for c in range(ord("b"), ord("i") + 1)
    )
    + "http_server_config:\n  headers:\n    X-Bomb: *i\n"
)


def users(hashed: str) -> str:
    return f"basic_auth_users:\n  alice: '{hashed}'\n"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        # bcrypt hashes, checked whole: prefix, cost, length, alphabet, padding bits
        (
            users(GOOD[:40]),
            "basic_auth_users.alice: a bcrypt hash is 60 characters long, this one 40",
        ),
        (
            users(GOOD + "x"),
            "basic_auth_users.alice: a bcrypt hash is 60 characters long, this one 61",
        ),
        (users("$2x$" + GOOD[4:]), "basic_auth_users.alice: not a bcrypt hash"),
        (users("$1$" + GOOD[3:]), "basic_auth_users.alice: not a bcrypt hash"),
        (users("$2y$03$" + GOOD[7:]), "basic_auth_users.alice: bcrypt cost must be 4..31, got 3"),
        (users("$2y$32$" + GOOD[7:]), "basic_auth_users.alice: bcrypt cost must be 4..31, got 32"),
        (users("$2y$1x$" + GOOD[7:]), "basic_auth_users.alice: no two-digit bcrypt cost"),
        (users(GOOD[:30] + "!" + GOOD[31:]), "basic_auth_users.alice: characters outside bcrypt's"),
        (users(GOOD[:28] + "/" + GOOD[29:]), "basic_auth_users.alice: damaged bcrypt hash"),
        (users(GOOD[:59] + "/"), "basic_auth_users.alice: damaged bcrypt hash"),
        ("basic_auth_users:\n  alice: 42\n", "basic_auth_users.alice: not a bcrypt hash"),
        (f"basic_auth_users:\n  'a:b': '{GOOD}'\n", "user name 'a:b' cannot hold ':'"),
        (f"basic_auth_users:\n  true: '{GOOD}'\n", "user name True must be a string"),
        # response headers: no injection, valid names, none the server sets itself
        (
            'http_server_config:\n  headers:\n    X-Evil: "a\\r\\nSet-Cookie: x=1"\n',
            "http_server_config.headers.X-Evil: the value holds CR, LF or NUL",
        ),
        (
            'http_server_config:\n  headers:\n    X-Evil: "a\\nb"\n',
            "http_server_config.headers.X-Evil: the value holds CR, LF or NUL",
        ),
        (
            'http_server_config:\n  headers:\n    X-Evil: "a\\0b"\n',
            "http_server_config.headers.X-Evil: the value holds CR, LF or NUL",
        ),
        (
            'http_server_config:\n  headers:\n    X-Evil: "caf\\u00e9"\n',
            "http_server_config.headers.X-Evil: the value must be printable ASCII",
        ),
        (
            "http_server_config:\n  headers:\n    Content-Length: '0'\n",
            "http_server_config.headers.Content-Length: the server sets this header itself",
        ),
        (
            "http_server_config:\n  headers:\n    transfer-encoding: chunked\n",
            "http_server_config.headers.transfer-encoding: the server sets this header itself",
        ),
        (
            "http_server_config:\n  headers:\n    'Bad Name': x\n",
            "http_server_config.headers: 'Bad Name' is not a valid header name",
        ),
        (
            'http_server_config:\n  headers:\n    "X-A\\r\\nX-B": x\n',
            "is not a valid header name",
        ),
        (
            "http_server_config:\n  headers:\n    X-Frame-Options: deny\n"
            "    x-frame-options: deny\n",
            "http_server_config.headers.x-frame-options: given twice",
        ),
        (
            "http_server_config:\n  headers:\n    X-List: [a, b]\n",
            "http_server_config.headers.X-List must be a string, got list",
        ),
        # YAML that expands, repeats itself or says more than the format
        (
            BILLION_LAUGHS,
            "line 1, column 4: YAML anchors and aliases (&name, *name) are not allowed",
        ),
        (
            "http_server_config: &h {}\nbasic_auth_users: *h\n",
            "line 1, column 21: YAML anchors and aliases",
        ),
        ("basic_auth_users: {}\nbasic_auth_users: {}\n", "line 2, column 1: duplicate key"),
        ("tls_server_cfg: {}\n", "unknown key(s) in the web config: tls_server_cfg"),
        ("rate_limit: {burst: 1}\n", "unknown key(s) in the web config: rate_limit"),
        (
            "tls_server_config:\n  cert_file: a\n  key_file: b\n  client_allowed_sans: [x]\n",
            "unknown key(s) in tls_server_config: client_allowed_sans",
        ),
        ("http_server_config:\n  http3: true\n", "unknown key(s) in http_server_config: http3"),
        ("http_server_config:\n  http2: maybe\n", "http_server_config.http2 must be true or false"),
        ("tls_server_config:\n  cert_file: [a]\n", "tls_server_config.cert_file must be a string"),
        ("[" * 5000 + "]" * 5000, "not valid YAML: nested too deeply"),
    ],
)
def test_a_bad_web_config_is_refused_with_its_reason(
    tmp_path: Path, content: str, problem: str
) -> None:
    path = tmp_path / "web.yml"
    path.write_text(content)
    with pytest.raises(WebConfigError) as caught:
        load_web_config(str(path))
    assert str(caught.value).startswith(f"{path}: ")
    assert problem in str(caught.value)
    assert GOOD[7:] not in str(caught.value)  # hashes are not repeated into logs


def test_a_huge_or_binary_file_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "web.yml"
    path.write_bytes(b"# " + b"x" * MAX_FILE_BYTES + b"\n")
    with pytest.raises(WebConfigError, match=f"larger than {MAX_FILE_BYTES} bytes"):
        load_web_config(str(path))
    path.write_bytes(b"basic_auth_users: {\xff: x}\n")
    with pytest.raises(WebConfigError, match="not UTF-8"):
        load_web_config(str(path))


def test_client_ca_without_a_client_auth_type_is_refused(tmp_path: Path, certificate) -> None:
    cert, key = certificate
    path = tmp_path / "web.yml"
    path.write_text(
        f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  client_ca_file: {cert}\n"
    )
    with pytest.raises(WebConfigError, match="client_ca_file is set but client_auth_type"):
        load_web_config(str(path))


def test_a_good_config_loads_as_the_toolkit_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "web.yml"
    path.write_text(
        "http_server_config:\n"
        "  http2: false\n"
        "  headers:\n"
        "    X-Frame-Options: deny\n"
        "    Strict-Transport-Security: max-age=31536000; includeSubDomains\n"
        "    X-XSS-Protection: 0\n"
        "basic_auth_users:\n"
        f"  alice: '{'$2y$' + GOOD[4:]}'\n"
        f"  bob: '{'$2a$' + GOOD[4:]}'\n"
        f"  123: '{GOOD}'\n"
    )
    config = load_web_config(str(path))
    assert config.headers == {
        "X-Frame-Options": "deny",
        "Strict-Transport-Security": "max-age=31536000; includeSubDomains",
        "X-XSS-Protection": "0",
    }
    assert sorted(config.basic_auth_users) == ["123", "alice", "bob"]
    assert config.ssl_context is None
    assert config.path == str(path)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (users(GOOD[:59]), "basic_auth_users.alice: a bcrypt hash is 60 characters long"),
        (
            'http_server_config:\n  headers:\n    X-Evil: "a\\r\\nb"\n',
            "http_server_config.headers.X-Evil: the value holds CR, LF or NUL",
        ),
        (BILLION_LAUGHS, "YAML anchors and aliases (&name, *name) are not allowed"),
        ("basic_auth_user: {}\n", "unknown key(s) in the web config: basic_auth_user"),
    ],
    ids=["truncated-hash", "crlf-header", "alias-bomb", "unknown-key"],
)
def test_the_exporter_refuses_to_start_with_a_bad_web_config(
    tmp_path: Path, content: str, problem: str
) -> None:
    path = tmp_path / "web.yml"
    path.write_text(content)
    result = run_exporter_cli(
        "--broker-url",
        "memory://",
        "--web.listen-address",
        f"127.0.0.1:{free_port()}",
        "--web.config.file",
        str(path),
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"celery-obs: invalid --web.config.file: {path}: ")
    assert problem in last
