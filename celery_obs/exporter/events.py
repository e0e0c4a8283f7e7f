"""Decode raw event messages into the event dicts Celery's own receiver would produce.

This is the hot path, so it avoids kombu's serializer registry and celery's `Receiver`: a body is
decoded with `json.loads` (or msgpack) by content type and a list body (workers batch task events
as `task.multi`) is flattened. Any other content type, pickle above all, is refused unread: the
exporter must never unpickle what is on a shared broker.

Two differences from Celery's receiver, on purpose. No `local_received` is stamped: the tracker
keeps its own clock, and a message's events are passed on as decoded. And timestamps are kept
as sent. The receiver
"localizes" each event's `timestamp` by the difference between the sender's and its own UTC
offset, but the timestamp is `time.time()`, seconds since the epoch, which no time zone changes:
shifting it puts hours of error into every wait between hosts in different time zones, and into
every comparison with an ETA (which is an absolute time).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from typing import Any

Event = dict[str, Any]

try:  # msgpack is optional: only clusters configured with event_serializer='msgpack' need it.
    import msgpack

    _msgpack_loads: Callable[[bytes], Any] | None = msgpack.unpackb
except ImportError:  # pragma: no cover - depends on the environment
    _msgpack_loads = None


#: A Celery event message is one event or a worker's batch (24 by default, each under a few kB
#: but for tracebacks): messages past these bounds are not Celery's, and are refused whole, so
#: one message can cost at most ~8 MB of decoding and 10,000 events of bookkeeping.
MAX_MESSAGE_BYTES = 8 << 20
MAX_EVENTS_PER_MESSAGE = 10_000


class MalformedMessage(ValueError):
    """A message (or an event inside it) that cannot be used; `reason` is a short label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


try:  # orjson parses event JSON several times faster; it is optional.
    import orjson

    def _loads_json(data: bytes | str) -> Any:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:  # e.g. integers past 64 bits, which json accepts
            return json.loads(data)

except ImportError:  # pragma: no cover - depends on the environment

    def _loads_json(data: bytes | str) -> Any:
        return json.loads(data)


DECODERS: dict[str, Callable[[Any], Any]] = {"application/json": _loads_json}
if _msgpack_loads is not None:
    DECODERS["application/x-msgpack"] = _msgpack_loads


# kombu writes every envelope the same way (json.dumps of a dict in a fixed order):
#   {"body": "<base64>", "content-encoding": "utf-8", "content-type": "<type>",
#    "headers": {...}, "properties": {..., "body_encoding": "base64", ...}}
# Parsing all of it as JSON, to keep only the body, was a third of the decoding.
_BODY_START = b'{"body": "'
_TYPE_START = b'", "content-encoding": "utf-8", "content-type": "'
_CONTENT_TYPES = {content_type.encode(): content_type for content_type in DECODERS}
_PROPERTIES = b'"properties": {'
_BASE64 = b'"body_encoding": "base64"'


def _kombu_envelope(payload: bytes) -> tuple[bytes, str] | None:
    """The body and content type of an envelope as kombu writes it, without parsing the rest;
    None for anything else (other writers, other encodings), which the full parse handles."""
    if not payload.startswith(_BODY_START):
        return None
    end = payload.find(b'"', len(_BODY_START))  # base64 holds no quote (nor escapes)
    if end < 0 or not payload.startswith(_TYPE_START, end):
        return None
    type_start = end + len(_TYPE_START)
    type_end = payload.find(b'", ', type_start)  # as kombu writes it, or the full parse decides
    content_type = _CONTENT_TYPES.get(payload[type_start:type_end]) if type_end > 0 else None
    if content_type is None:
        return None
    # The properties come last: their body_encoding, not a header's, says base64.
    properties = payload.rfind(_PROPERTIES)
    if properties < end or payload.find(_BASE64, properties) < 0:
        return None
    try:
        return binascii.a2b_base64(payload[len(_BODY_START) : end]), content_type
    except binascii.Error:
        return None  # the full parse says why


class EventDecoder:
    """Turn (body, content_type) into a list of event dicts.

    Events that are not dicts with a string `type` are skipped and reported through
    `on_malformed(reason)` so one bad event in a batch does not cost the others.
    """

    def __init__(self, on_malformed: Callable[[str], None]) -> None:
        self._on_malformed = on_malformed

    def decode_envelope(self, payload: bytes) -> list[Event]:
        """Decode a kombu virtual-transport envelope (a Redis pub/sub payload) and its body."""
        if len(payload) > MAX_MESSAGE_BYTES:  # base64 inflates the body: bound the envelope
            raise MalformedMessage("too_large", f"{len(payload)} bytes")
        body_and_type = _kombu_envelope(payload)
        if body_and_type is not None:
            return self.decode(*body_and_type)
        try:
            envelope = _loads_json(payload)
            body = envelope["body"]
            if envelope["properties"].get("body_encoding") == "base64":
                body = base64.b64decode(body)
            content_type = envelope.get("content-type")
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
            raise MalformedMessage("envelope", f"{type(exc).__name__}: {exc}") from None
        return self.decode(body, content_type)

    def decode(self, body: bytes | str, content_type: str | None) -> list[Event]:
        decoder = DECODERS.get(content_type or "")
        if decoder is None:
            raise MalformedMessage("content_type", repr(content_type)[:100])
        if len(body) > MAX_MESSAGE_BYTES:
            raise MalformedMessage("too_large", f"{len(body)} bytes")
        try:
            payload = decoder(body)
        except Exception as exc:  # any decoder error means the same thing: unusable body
            raise MalformedMessage("decode", f"{type(exc).__name__}: {exc}") from None
        items = payload if isinstance(payload, list) else [payload]
        if len(items) > MAX_EVENTS_PER_MESSAGE:
            raise MalformedMessage("too_many_events", f"{len(items)} events")
        # Celery's receiver also stamps `local_received`; nothing here reads it (the tracker
        # keeps its own clock), so the events are passed on as sent, and most messages whole.
        for item in items:
            if type(item) is not dict or type(item.get("type")) is not str:
                return self._events_of(items)
        return items

    def _events_of(self, items: list[Any]) -> list[Event]:
        """The events of a message that also holds something else: each other item skipped and
        counted."""
        events: list[Event] = []
        for item in items:
            if isinstance(item, dict) and isinstance(item.get("type"), str):
                events.append(item)
            else:
                self._on_malformed("not_an_event")
        return events
