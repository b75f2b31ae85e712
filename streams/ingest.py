"""Ingest: consumes raw behaviour, catalogue and forget events; emits user updates, encode requests
and dead letters.

Every input is validated; a rejected one goes to the dead-letter topic with its reason and bytes and
the stream goes on.
"""

from __future__ import annotations

from typing import Any, TypedDict

import structlog

from schemas.events import (
    BehaviorEvent,
    Event,
    ForgetUserEvent,
    ItemEvent,
    ItemRemovedEvent,
    ReviewEvent,
)
from schemas.internal import EncodeRequest, UserUpdate
from schemas.privacy import scrub_pii
from schemas.serde import InvalidEvent, decode_input
from schemas.topics import ENCODE_REQUESTS, USER_UPDATES
from streams.observe import count_events
from streams.sinks import Output, Sinks, UpdatePacker

STEP = "validate-input"
log = structlog.get_logger(__name__)


class _Envelope(TypedDict):
    event_id: str
    ts: int
    received_ms: int


def _json(record: Any) -> bytes:
    return record.model_dump_json(exclude_none=True).encode()


def route(event: Event, received_ms: int, *, scrub: bool = True) -> list[Output]:
    """What one valid input becomes downstream (pure).

    ``scrub``: a review's text is embedded (and its snippet kept in the user's state) only after
    :func:`schemas.privacy.scrub_pii` has replaced e-mail addresses, phone and card numbers.
    """
    base: _Envelope = {"event_id": event.event_id, "ts": event.ts, "received_ms": received_ms}
    match event:
        case BehaviorEvent():
            update = UserUpdate(
                **base,
                kind="behavior",
                user_id=event.user_id,
                event_type=event.type,
                item_id=event.item_id,
                value=event.value,
            )
            return [Output(USER_UPDATES, event.user_id, _json(update))]
        case ReviewEvent():
            update = UserUpdate(
                **base,
                kind="behavior",
                user_id=event.user_id,
                event_type="review",
                item_id=event.item_id,
                value=event.rating,
            )
            request = EncodeRequest(
                **base,
                kind="review",
                item_id=event.item_id,
                user_id=event.user_id,
                text=scrub_pii(event.text) if scrub else event.text,
                rating=event.rating,
            )
            return [
                Output(USER_UPDATES, event.user_id, _json(update)),
                Output(ENCODE_REQUESTS, event.item_id, _json(request)),
            ]
        case ItemEvent():
            request = EncodeRequest(
                **base,
                kind="item",
                item_id=event.item_id,
                text=event.text(),
                title=event.title,
                categories=event.categories,
                available=event.available,
            )
            return [Output(ENCODE_REQUESTS, event.item_id, _json(request))]
        case ItemRemovedEvent():
            request = EncodeRequest(**base, kind="item_removed", item_id=event.item_id)
            return [Output(ENCODE_REQUESTS, event.item_id, _json(request))]
        case ForgetUserEvent():
            update = UserUpdate(**base, kind="forget", user_id=event.user_id, event_type=event.type)
            return [Output(USER_UPDATES, event.user_id, _json(update))]
    raise InvalidEvent("unroutable", f"no route for event type {event.type!r}")


def decode_message(message: Any) -> tuple[Event, int]:
    """A Faust message to its validated event and the broker's receive time in ms."""
    received_ms = int(message.timestamp * 1000)
    defaults = {
        "event_id": f"{message.topic}-{message.partition}-{message.offset}",
        "ts": received_ms,
    }
    return decode_input(message.value, topic=message.topic, defaults=defaults), received_ms


async def ingest(
    stream: Any,
    *,
    sinks: Sinks,
    batch_size: int,
    batch_wait_s: float,
    scrub: bool = True,
    partitions: int = 1,
) -> None:
    """Validate each input; route it (review text scrubbed if ``scrub``), or dead-letter it.

    A batch's user updates leave as one message per partition of the user-updates topic
    (``partitions`` of them; see :class:`streams.sinks.UpdatePacker`)."""
    async for events in stream.take_events(batch_size, within=batch_wait_s):
        count_events(STEP, events)
        packer = UpdatePacker(partitions)
        for event in events:
            try:
                valid, received_ms = decode_message(event.message)
                outputs = route(valid, received_ms, scrub=scrub)
            except InvalidEvent as exc:
                sinks.dead(stage=STEP, message=event.message, exc=exc)
                continue
            for out in outputs:
                sinks.send_all(packer.add(out) if out.spec is USER_UPDATES else [out])
        sinks.send_all(packer.drain())
