"""Logstash's pipeline and settings agree with the rest of the stack.

Logstash cannot run here, so the pipeline is read lightly: each plugin block is cut out by
brace matching and its `key => value` settings compared with the names the other parts use
(ports log_shipping and docker-compose point at, the data stream the templates cover, the
environment variables the setup command reads).
"""

from __future__ import annotations

import fnmatch
import re

import pytest
import yaml

from celery_obs.setup.assets import DATA_STREAM_TYPE, DATASET, INDEX_PATTERN, LOGSTASH_PORTS

from support import ROOT

PIPELINE = ROOT / "logstash/pipeline/celery.conf"


def _without_comments(text: str) -> str:
    return "\n".join(re.sub(r"(^|\s)#.*$", "", line) for line in text.splitlines())


def _masked(text: str) -> str:
    """The text with string and regex literals blanked out (same length): a brace inside
    `"..."` or `=~ /.../` is not structure."""
    literal = re.compile(r'"(?:[^"\\]|\\.)*"|(?<==~)\s*/(?:[^/\\]|\\.)*/')
    return literal.sub(lambda m: " " * len(m.group(0)), text)


def blocks(section: str) -> dict[str, str]:
    """`input { http {...} tcp {...} }` -> {"http": "...", "tcp": "..."} (one of each kind)."""
    text = _without_comments(PIPELINE.read_text())
    masked = _masked(text)
    start = re.search(rf"^{section}\s*\{{", masked, re.M)
    assert start, f"no {section} section"
    found: dict[str, str] = {}
    depth, i, name_start = 1, start.end(), start.end()
    while depth:
        char = masked[i]
        if char == "{":
            if depth == 1:
                name = masked[name_start:i].strip().split()[-1]
                body_start = i + 1
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 1:
                found[name] = text[body_start:i]
                name_start = i + 1
        i += 1
    return found


def settings(block: str) -> dict[str, str]:
    pairs = re.findall(r"^\s*([\w\[\]@]+)\s*=>\s*(.+?)\s*$", block, re.M)
    return {key: value.strip('"') for key, value in pairs}


def test_inputs_listen_where_the_shippers_send() -> None:
    inputs = blocks("input")
    assert set(inputs) == set(LOGSTASH_PORTS) == {"http", "tcp", "beats"}
    for kind, port in LOGSTASH_PORTS.items():
        assert settings(inputs[kind])["port"] == str(port)
    assert settings(inputs["tcp"])["codec"] == "json_lines"
    http = settings(inputs["http"])
    assert http["codec"] == "json"  # a POSTed JSON array becomes one event per element
    assert '"application/json" => "json"' in http["additional_codecs"]


def test_http_input_keeps_the_request_out_of_the_document() -> None:
    http = settings(blocks("input")["http"])
    assert http["ecs_compatibility"] == "disabled"  # else it writes http.*, url.*, host.ip
    assert http["request_headers_target_field"].startswith("[@metadata]")
    assert http["remote_host_target_field"].startswith("[@metadata]")


def test_output_writes_the_logs_celery_data_stream() -> None:
    (output,) = blocks("output").values()
    es = settings(output)
    assert es["data_stream"] == "true"
    assert (es["data_stream_type"], es["data_stream_dataset"]) == (DATA_STREAM_TYPE, DATASET)
    namespace = re.fullmatch(r"\$\{CELERY_LOGS_NAMESPACE:(\w+)\}", es["data_stream_namespace"])
    assert namespace
    assert namespace.group(1) == "default"
    name = f"{es['data_stream_type']}-{es['data_stream_dataset']}-{namespace.group(1)}"
    assert fnmatch.fnmatchcase(name, INDEX_PATTERN)
    assert es["data_stream_auto_routing"] == "false"
    assert (es["hosts"], es["user"], es["password"]) == (
        "${ELASTICSEARCH_HOSTS}",
        "${ELASTICSEARCH_USERNAME}",
        "${ELASTICSEARCH_PASSWORD}",
    )
    # In data stream mode the output refuses these (templates come from `celery-obs setup`).
    for refused in ("index", "manage_template", "ilm_enabled", "template", "action"):
        assert refused not in es
    assert "ssl_certificate_authorities" in PIPELINE.read_text()  # TLS: documented, commented


def test_filters_drop_logstash_bookkeeping_but_not_the_records_fields() -> None:
    text = _without_comments(PIPELINE.read_text())
    removed = re.search(r"remove_field\s*=>\s*\[(.*)\]\s*$", text, re.M)
    assert removed
    fields = set(re.findall(r'"([^"]+)"', removed.group(1)))
    assert fields == {"@version", "[event][original]"}
    assert "@timestamp" not in removed.group(1)
    assert not re.search(r"\bdate\s*\{", text)  # nothing rewrites the record's @timestamp


def test_every_environment_variable_has_a_known_name() -> None:
    used = set(re.findall(r"\$\{(\w+)(?::[^}]*)?\}", _without_comments(PIPELINE.read_text())))
    assert used == {
        "ELASTICSEARCH_HOSTS",
        "ELASTICSEARCH_USERNAME",
        "ELASTICSEARCH_PASSWORD",
        "CELERY_LOGS_NAMESPACE",
    }


def test_settings_turn_on_the_persistent_and_dead_letter_queues() -> None:
    config = yaml.safe_load((ROOT / "logstash/config/logstash.yml").read_text())
    assert config["queue.type"] == "persisted"
    assert re.fullmatch(r"\d+(mb|gb)", config["queue.max_bytes"])
    assert config["dead_letter_queue.enable"] is True
    assert config["api.http.host"] == "0.0.0.0"
    assert config["api.http.port"] == 9600
    assert config["pipeline.ecs_compatibility"] == "v8"


def test_pipelines_yml_runs_the_celery_pipeline() -> None:
    (pipeline,) = yaml.safe_load((ROOT / "logstash/config/pipelines.yml").read_text())
    assert pipeline["pipeline.id"] == "celery"
    assert pipeline["path.config"].endswith("/" + PIPELINE.name)
    assert pipeline["pipeline.ecs_compatibility"] == "v8"


@pytest.mark.parametrize("section", ["input", "filter", "output"])
def test_braces_balance(section: str) -> None:
    masked = _masked(_without_comments(PIPELINE.read_text()))
    assert masked.count("{") == masked.count("}")
    assert blocks(section)


# -- the Filebeat example: container stdout into the beats input -----------------------------

FILEBEAT = ROOT / "logstash/filebeat/filebeat.yml"
#: Option names from Filebeat 8's reference (filestream input, container parser, processors,
#: Logstash output): a misspelt option is ignored by Filebeat, so it must fail here.
FILEBEAT_TOP = {"filebeat.inputs", "output.logstash", "processors", "logging.level"}
FILESTREAM = {"type", "id", "paths", "prospector.scanner.symlinks", "parsers", "processors"}
CONTAINER_PARSER = {"stream", "format"}
LOGSTASH_OUTPUT = {"hosts", "loadbalance", "ssl.enabled", "ssl.certificate_authorities"}


def test_the_filebeat_example_ships_worker_stdout_to_the_beats_input() -> None:
    config = yaml.safe_load(FILEBEAT.read_text())
    assert set(config) <= FILEBEAT_TOP
    [stream] = config["filebeat.inputs"]
    assert set(stream) <= FILESTREAM
    assert stream["type"] == "filestream"
    assert stream["id"]
    assert stream["paths"]
    assert stream["prospector.scanner.symlinks"] is True
    [parser] = stream["parsers"]
    assert set(parser) == {"container"}  # no ndjson parser: the pipeline decodes `message`
    assert set(parser["container"]) <= CONTAINER_PARSER
    assert parser["container"]["stream"] == "stdout"  # where log_shipping writes by default
    assert set(config["output.logstash"]) <= LOGSTASH_OUTPUT
    [host] = config["output.logstash"]["hosts"]
    assert host.endswith(f":{LOGSTASH_PORTS['beats']}}}")  # ${LOGSTASH_HOSTS:logstash:5044}
    beats = settings(blocks("input")["beats"])
    assert beats["port"] == str(LOGSTASH_PORTS["beats"])
    assert '"[@metadata][celery_input]" => "beats"' in blocks("input")["beats"]


def test_the_filebeat_example_keeps_records_and_drops_plain_lines() -> None:
    import json as json_module

    config = yaml.safe_load(FILEBEAT.read_text())
    [stream] = config["filebeat.inputs"]
    [drop] = [p["drop_event"] for p in stream["processors"] if "drop_event" in p]
    pattern = re.compile(drop["when"]["not"]["regexp"]["message"])
    from es_mapping_model import lifecycle_records

    for record in lifecycle_records():
        assert pattern.match(json_module.dumps(record, separators=(",", ":")))
    assert not pattern.match("[2026-12-05 21:00:00,000: INFO/MainProcess] Connected to redis://")
