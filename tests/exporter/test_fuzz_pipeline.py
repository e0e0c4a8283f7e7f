"""Fuzzing the whole processing path: message bytes -> decoder -> tracker -> /metrics text.

Whatever arrives on the event channel (random bytes, JSON of any shape, events whose fields hold
any value: lone surrogates, huge integers, NaN, nested lists, megabytes of text), the consumer
never raises, the events around a bad one still count, and the exposition stays valid: UTF-8,
parsed by Prometheus' own text parser (promtool) and by prometheus_client's.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from celery_obs.exporter.collector import Exposition
from celery_obs.exporter.consumer import BrokerStatus, EventConsumer
from celery_obs.exporter.queues import QueueLengths
from celery_obs.exporter.tracker import Tracker
from celery_obs.exporter.vocabulary import KNOWN_EVENT_TYPES

from test_tracker import Clock

FIELDS = (
    "uuid",
    "name",
    "queue",
    "hostname",
    "timestamp",
    "utcoffset",
    "retries",
    "eta",
    "runtime",
    "exception",
    "traceback",
    "active",
    "processed",
    "requeue",
)

any_text = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, categories=None))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.just(10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    any_text,
    st.sampled_from(["t1", "t2", "app.add", "q", "w@h", "1970-01-01T00:00:01", "E('x')"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
    max_leaves=8,
)
events = st.fixed_dictionaries(
    {"type": st.sampled_from(sorted(KNOWN_EVENT_TYPES)) | any_text},
    optional={field: values for field in FIELDS},
)
bodies = st.one_of(
    st.binary(max_size=200),
    events.map(json.dumps),
    st.lists(events, max_size=6).map(json.dumps),
    values.map(lambda v: json.dumps(v)),
)


class Pipeline:
    def __init__(self) -> None:
        self.tracker = Tracker(clock=Clock())
        lock = threading.Lock()
        status = BrokerStatus(broker="redis://h//", connected=True)
        self.consumer = EventConsumer(lambda: None, self.tracker, lock, status)  # type: ignore[arg-type, return-value]
        self.exposition = Exposition(self.tracker, lock, status, QueueLengths(), "fuzz")

    def feed(self, body: str | bytes) -> None:
        raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
        self.consumer.on_bodies([(raw, "application/json")])
        envelope = {
            "body": body if isinstance(body, str) else raw.decode("latin-1"),
            "content-type": "application/json",
            "properties": {},
        }
        self.consumer.on_payloads([json.dumps(envelope).encode()])

    def scrape(self) -> str:
        text = self.exposition.render().decode("utf-8")  # strict: must be valid UTF-8
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                assert isinstance(sample.value, (int, float))
        return text


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(bodies, min_size=1, max_size=8))
def test_any_message_leaves_the_pipeline_alive_and_metrics_valid(messages) -> None:
    pipeline = Pipeline()
    for body in messages:
        pipeline.feed(body)
    pipeline.scrape()
    # A good event after whatever came before is still counted.
    good = {"type": "worker-heartbeat", "hostname": "after@fuzz", "timestamp": 1.0}
    pipeline.feed(json.dumps(good))
    assert 'celery_worker_up{hostname="after@fuzz"} 1' in pipeline.scrape()


def random_event(rng: random.Random) -> dict:
    event: dict = {"type": rng.choice(sorted(KNOWN_EVENT_TYPES))}
    for field in rng.sample(FIELDS, rng.randint(1, len(FIELDS))):
        event[field] = rng.choice(
            [
                f"t{rng.randint(1, 50)}",
                "".join(chr(rng.randint(0, 0x10FFFF)) for _ in range(rng.randint(0, 20))),
                "\ud800",
                "x" * rng.randint(200, 2000),
                rng.random() * 1e6,
                float("nan"),
                10 ** rng.randint(1, 400),
                -1,
                [1, {"a": None}],
                None,
            ]
        )
    return event


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs Debian's prometheus")
def test_promtool_accepts_the_exposition_after_a_hostile_corpus() -> None:
    rng = random.Random(20261130)
    pipeline = Pipeline()
    for _ in range(3000):
        batch = [random_event(rng) for _ in range(rng.randint(1, 5))]
        pipeline.feed(json.dumps(batch))
    text = pipeline.scrape()
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=text.encode(), capture_output=True, check=False
    )
    # promtool exits 0 for valid exposition; lint remarks alone (exit 3) concern names only.
    problems = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 0, problems


def envelope_of(body: str | bytes) -> bytes:
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    import base64

    return json.dumps(
        {
            "body": base64.b64encode(raw).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {},
            "properties": {"body_encoding": "base64"},
        }
    ).encode()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(bodies, min_size=1, max_size=8))
def test_payloads_handed_over_together_count_as_one_by_one(messages) -> None:
    """The Redis reader hands a slice's payloads over at once: whatever they hold, good or
    bad, the result is that of handing them over one at a time."""
    one_by_one, together = Pipeline(), Pipeline()
    payloads = [envelope_of(body) for body in messages]
    for payload in payloads:
        one_by_one.consumer.on_payloads([payload])
    together.consumer.on_payloads(payloads)
    assert together.scrape() == one_by_one.scrape()
