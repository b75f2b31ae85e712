"""Bytes <-> events: decoding with clear reasons, encoding, and dead letters.

Decoding never raises anything but :class:`InvalidEvent`, whose ``error_type`` and message go into
the dead letter verbatim.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from pydantic import ValidationError

from schemas.events import INPUT_TYPES, SCHEMA_VERSION, DeadLetter, Event
from schemas.topics import topic_for_type

MAX_EVENT_BYTES = 256 * 1024


class InvalidEvent(ValueError):
    """An input that cannot be accepted; ``error_type`` is a short stable code for metrics."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False)[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "event"
        parts.append(f"{where}: {err['msg']}")
    more = len(exc.errors()) - 5
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def parse_object(raw: bytes) -> dict[str, Any]:
    """Bytes to a JSON object, or :class:`InvalidEvent` saying why not."""
    if len(raw) > MAX_EVENT_BYTES:
        raise InvalidEvent("too_large", f"event is {len(raw)} bytes, more than {MAX_EVENT_BYTES}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEvent(
            "not_utf8", f"event is not UTF-8: {exc.reason} at byte {exc.start}"
        ) from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidEvent("bad_json", f"event is not JSON: {exc.msg} at char {exc.pos}") from None
    except (ValueError, RecursionError) as exc:  # over-long integers, absurd nesting
        raise InvalidEvent("bad_json", f"event is not usable JSON: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise InvalidEvent("not_object", f"event is a JSON {type(obj).__name__}, not an object")
    return obj


def validate_object(obj: dict[str, Any], topic: str | None = None) -> Event:
    """A JSON object to its event record; ``topic`` (if given) must be the type's topic."""
    event_type = obj.get("type")
    if not isinstance(event_type, str) or not event_type:
        raise InvalidEvent("missing_type", "event has no 'type' field")
    record = INPUT_TYPES.get(event_type)
    if record is None:
        known = ", ".join(sorted(INPUT_TYPES))
        raise InvalidEvent(
            "unknown_type", f"unknown event type {event_type!r}; expected one of {known}"
        )
    expected = topic_for_type(event_type).name
    if topic is not None and topic != expected:
        raise InvalidEvent(
            "wrong_topic", f"a {event_type!r} event belongs on {expected}, not {topic}"
        )
    version = obj.get("schema_version")
    if version is not None and (type(version) is not int or version != SCHEMA_VERSION):
        raise InvalidEvent(
            "wrong_version",
            f"schema_version {version!r} is not supported; this reader implements version "
            f"{SCHEMA_VERSION} (topic {expected})",
        )
    try:
        return record.model_validate(obj)
    except ValidationError as exc:
        raise InvalidEvent("invalid_field", f"{event_type}: {_describe(exc)}") from None
    except ValueError as exc:  # raised by model_post_init cross-field checks
        raise InvalidEvent("invalid_field", f"{event_type}: {exc}") from None


def decode_input(
    raw: bytes | None, topic: str | None = None, defaults: dict[str, Any] | None = None
) -> Event:
    """Decode and validate one input message; ``defaults`` fill absent envelope fields."""
    if raw is None:
        raise InvalidEvent("empty", "message has no value")
    obj = parse_object(raw)
    if defaults:
        obj = {**obj, **{k: v for k, v in defaults.items() if obj.get(k) is None}}
    return validate_object(obj, topic)


def encode(event: Event) -> bytes:
    """An event as compact JSON bytes (absent optional fields are left out)."""
    return event.model_dump_json(exclude_none=True).encode("utf-8")


def dead_letter(
    *, stage: str, topic: str, partition: int, offset: int, raw: bytes | None, exc: Exception
) -> DeadLetter:
    """The dead letter for an input that failed at ``stage``."""
    error_type = exc.error_type if isinstance(exc, InvalidEvent) else type(exc).__name__
    return DeadLetter(
        stage=stage,
        topic=topic,
        partition=partition,
        offset=offset,
        error_type=error_type,
        error=str(exc)[:2000],
        payload_b64=base64.b64encode(raw or b"").decode("ascii"),
    )
