"""The decoding fast path gives what Celery's own Receiver gives, and never unpickles."""

from __future__ import annotations

import json
import pickle

import msgpack
import pytest
from celery import Celery
from celery.events import Event
from celery.events.receiver import EventReceiver as Receiver

from celery_obs.exporter.events import EventDecoder, MalformedMessage

NOW = 1_700_000_000.0

TASK_EVENTS = [
    Event(
        "task-sent",
        uuid="u1",
        name="a.b",
        args="()",
        kwargs="{}",
        retries=0,
        eta=None,
        expires=None,
        queue="celery",
        exchange="",
        routing_key="celery",
        root_id="u1",
        parent_id=None,
        hostname="gen1@producer",
        utcoffset=-5,
        pid=11,
        clock=3,
    ),
    Event(
        "task-received",
        uuid="u1",
        name="a.b",
        args="()",
        kwargs="{}",
        root_id="u1",
        parent_id=None,
        retries=0,
        eta=None,
        expires=None,
        hostname="w@h",
        utcoffset=2,
        clock=9,
    ),
    Event("task-started", uuid="u1", hostname="w@h", pid=12, utcoffset=0, clock=10),
    Event("task-succeeded", uuid="u1", result="3", runtime=0.25, hostname="w@h", utcoffset=0),
    Event("task-failed", uuid="u1", exception="ValueError('x')", traceback="Tb", hostname="w@h"),
    Event("task-retried", uuid="u1", exception="Retry()", traceback="Tb", hostname="w@h"),
    Event("task-revoked", uuid="u1", terminated=False, signum=None, expired=True, hostname="w@h"),
    Event("task-rejected", uuid="u1", requeue=False, hostname="w@h"),
    Event(
        "worker-heartbeat",
        hostname="w@h",
        freq=2.0,
        active=1,
        processed=9,
        loadavg=[0.1, 0.2, 0.3],
        sw_ident="py-celery",
        sw_ver="5.7.0",
        sw_sys="Linux",
    ),
]


def celery_view(body: dict) -> dict:
    """What celery's Receiver makes of one event body (clock and local_received aside: they are
    receiver state, and the tracker keeps its own clock), with
    timestamps kept as sent (see exporter/events.py: the receiver's "localizing" is wrong)."""
    app = Celery(broker="memory://", set_as_current=False)
    receiver = Receiver(app.connection_for_read(), app=app)
    _, event = receiver.event_from_message(
        json.loads(json.dumps(body)), localize=False, now=lambda: NOW
    )
    event.pop("clock", None)
    event.pop("local_received", None)
    return event


def decoder(malformed: list[str] | None = None) -> EventDecoder:
    sink = malformed if malformed is not None else []
    return EventDecoder(on_malformed=sink.append)


def strip_clock(events: list[dict]) -> list[dict]:
    for event in events:
        event.pop("clock", None)
    return events


@pytest.mark.parametrize("body", TASK_EVENTS, ids=[e["type"] for e in TASK_EVENTS])
def test_single_event_matches_celery_receiver(body: dict) -> None:
    ours = strip_clock(decoder().decode(json.dumps(body).encode(), "application/json"))
    assert ours == [celery_view(body)]


def test_batched_list_matches_celery_receiver_event_by_event() -> None:
    ours = strip_clock(decoder().decode(json.dumps(TASK_EVENTS).encode(), "application/json"))
    assert ours == [celery_view(body) for body in TASK_EVENTS]


def test_msgpack_bodies_decode_like_json() -> None:
    packed = msgpack.packb(TASK_EVENTS)
    ours = strip_clock(decoder().decode(packed, "application/x-msgpack"))
    assert ours == [celery_view(body) for body in TASK_EVENTS]


def test_timestamps_are_kept_as_sent_whatever_the_senders_time_zone() -> None:
    # A producer on UTC+2 and a worker on UTC-5 stamp time.time(): epoch seconds, which no time
    # zone changes. Shifted by their offsets, a 1 s wait between them would read as 7 hours.
    body = [
        {"type": "task-sent", "timestamp": 100.0, "utcoffset": -2},
        {"type": "task-started", "timestamp": 101.0, "utcoffset": 5},
    ]
    events = decoder().decode(json.dumps(body).encode(), "application/json")
    assert [e["timestamp"] for e in events] == [100.0, 101.0]


def explode() -> None:
    raise AssertionError("unpickled!")


class Boom:
    def __reduce__(self):  # unpickling this calls explode()
        return (explode, ())


def test_pickle_is_never_unpickled() -> None:
    with pytest.raises(MalformedMessage) as caught:
        decoder().decode(pickle.dumps(Boom()), "application/x-python-serialize")
    assert caught.value.reason == "content_type"


@pytest.mark.parametrize(
    ("body", "content_type", "reason"),
    [
        (b"{not json", "application/json", "decode"),
        (b"\xff\xfe", "application/json", "decode"),
        (b"<xml/>", "application/xml", "content_type"),
        (b"{}", None, "content_type"),
    ],
)
def test_undecodable_bodies_raise_malformed(body: bytes, content_type: str, reason: str) -> None:
    with pytest.raises(MalformedMessage) as caught:
        decoder().decode(body, content_type)
    assert caught.value.reason == reason


def test_bad_items_in_a_batch_cost_only_themselves() -> None:
    malformed: list[str] = []
    body = json.dumps(
        [
            {"type": "task-started", "uuid": "a"},
            42,
            {"no": "type"},
            {"type": "t", "timestamp": "x", "utcoffset": 1},  # the tracker judges fields
        ]
    ).encode()
    events = decoder(malformed).decode(body, "application/json")
    assert [e.get("uuid") for e in events] == ["a", None]
    assert malformed == ["not_an_event", "not_an_event"]


def base64_of(body: bytes) -> str:
    import base64

    return base64.b64encode(body).decode()


def kombu_envelope(body: bytes, content_type: str = "application/json", **more) -> bytes:
    """A Redis pub/sub payload as kombu's virtual transport writes it (json.dumps, this order)."""
    envelope = {
        "body": base64_of(body),
        "content-encoding": "utf-8",
        "content-type": content_type,
        "headers": {"hostname": "w@h"},
        "properties": {
            "delivery_mode": 1,
            "delivery_info": {"exchange": "celeryev", "routing_key": "task.started"},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": "5e5c",
        },
    }
    envelope.update(more)
    return json.dumps(envelope).encode()


def full_parse_only(monkeypatch) -> None:
    from celery_obs.exporter import events

    monkeypatch.setattr(events, "_kombu_envelope", lambda payload: None)


@pytest.mark.parametrize(
    "payload",
    [
        kombu_envelope(json.dumps(dict(TASK_EVENTS[0])).encode()),
        kombu_envelope(json.dumps([dict(e) for e in TASK_EVENTS]).encode()),
        kombu_envelope(msgpack.packb(dict(TASK_EVENTS[0])), "application/x-msgpack"),
        # Not base64 (a header names body_encoding: only the properties' counts).
        json.dumps(
            {
                "body": json.dumps(dict(TASK_EVENTS[0])),
                "content-encoding": "utf-8",
                "content-type": "application/json",
                "headers": {"body_encoding": "base64"},
                "properties": {"delivery_info": {}},
            }
        ).encode(),
        # Another writer's key order.
        json.dumps(
            {
                "properties": {"body_encoding": "base64"},
                "content-type": "application/json",
                "body": base64_of(json.dumps(dict(TASK_EVENTS[0])).encode()),
            }
        ).encode(),
    ],
    ids=["json", "batch", "msgpack", "raw-body", "other-order"],
)
def test_the_envelope_shortcut_decodes_what_the_full_parse_does(payload, monkeypatch) -> None:
    shortcut = decoder().decode_envelope(payload)
    full_parse_only(monkeypatch)
    assert shortcut == decoder().decode_envelope(payload)
    assert shortcut


@pytest.mark.parametrize(
    "payload",
    [
        kombu_envelope(b"\x80\x04pickle", "application/x-python-serialize"),
        kombu_envelope(b"{not json"),
        b'{"body": "!!!not base64", "content-encoding": "utf-8", "content-type": '
        b'"application/json", "headers": {}, "properties": {"body_encoding": "base64"}}',
        # Not JSON right after the content type (found by review: the shortcut once read the
        # type up to any quote, so this decoded).
        b'{"body": "eyJ0eXBlIjoidGFzay1zZW50In0=", "content-encoding": "utf-8", '
        b'"content-type": "application/json"X "headers": {}, "properties": '
        b'{"body_encoding": "base64"}}',
        # No quote after the content type at all.
        b'{"body": "eyJ0eXBlIjoidGFzay1zZW50In0=", "content-encoding": "utf-8", '
        b'"content-type": "application/jsonX',
    ],
)
def test_the_envelope_shortcut_refuses_what_the_full_parse_refuses(payload, monkeypatch) -> None:
    with pytest.raises(MalformedMessage) as shortcut:
        decoder().decode_envelope(payload)
    full_parse_only(monkeypatch)
    with pytest.raises(MalformedMessage) as full:
        decoder().decode_envelope(payload)
    assert shortcut.value.reason == full.value.reason
