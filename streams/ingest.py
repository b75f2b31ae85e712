"""Ingest: consumes raw behaviour, catalogue and forget events; emits user updates, encode requests
and dead letters (in a worker that also keeps user state, it applies the updates of the users
whose partition it holds itself).

Every input is validated; a rejected one goes to the dead-letter topic with its reason and bytes and
the stream goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypedDict, cast

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
from schemas.topics import ENCODE_REQUESTS, USER_UPDATES, TopicSpec
from streams.observe import count_events
from streams.sinks import Output, Sinks, UpdatePacker
from streams.transport import fresh

if TYPE_CHECKING:
    from streams.user_state import LocalUpdates

STEP = "validate-input"
log = structlog.get_logger(__name__)


class _Envelope(TypedDict):
    event_id: str
    ts: int
    received_ms: int


def _json(record: Any) -> bytes:
    return record.model_dump_json(exclude_none=True).encode()


Routed = tuple[TopicSpec, str, EncodeRequest | UserUpdate]


def route_records(event: Event, received_ms: int, *, scrub: bool = True) -> list[Routed]:
    """What one valid input becomes downstream (pure): each record with its topic and key.

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
            return [(USER_UPDATES, event.user_id, update)]
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
                (USER_UPDATES, event.user_id, update),
                (ENCODE_REQUESTS, event.item_id, request),
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
            return [(ENCODE_REQUESTS, event.item_id, request)]
        case ItemRemovedEvent():
            request = EncodeRequest(**base, kind="item_removed", item_id=event.item_id)
            return [(ENCODE_REQUESTS, event.item_id, request)]
        case ForgetUserEvent():
            update = UserUpdate(**base, kind="forget", user_id=event.user_id, event_type=event.type)
            return [(USER_UPDATES, event.user_id, update)]
    raise InvalidEvent("unroutable", f"no route for event type {event.type!r}")


def route(event: Event, received_ms: int, *, scrub: bool = True) -> list[Output]:
    """:func:`route_records` as the messages the ingest hop sends."""
    return [
        Output(spec, key, _json(record))
        for spec, key, record in route_records(event, received_ms, scrub=scrub)
    ]


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
    local: LocalUpdates | None = None,
    outdated: Callable[[Any], bool] | None = None,
) -> None:
    """Validate each input; route it (review text scrubbed if ``scrub``), or dead-letter it.

    A batch's user updates leave as one message per partition of the user-updates topic
    (``partitions`` of them; see :class:`streams.sinks.UpdatePacker`), except, with ``local``,
    those of the users whose partition this worker holds: they go straight to its user-state
    step, after the batch's messages are sent (:class:`streams.user_state.LocalUpdates`).
    ``outdated``: messages that are no longer this worker's to take (a rebalance came between
    their fetch and now) are left (:func:`streams.transport.fresh`)."""
    async for taken in stream.take_events(batch_size, within=batch_wait_s):
        count_events(STEP, taken)
        if local is not None:
            await local.ready()
        events = fresh(taken, outdated, STEP)
        packer = UpdatePacker(partitions)
        mine: list[tuple[UserUpdate, Any]] = []
        for event in events:
            try:
                valid, received_ms = decode_message(event.message)
                routed = route_records(valid, received_ms, scrub=scrub)
            except InvalidEvent as exc:
                sinks.dead(stage=STEP, message=event.message, exc=exc)
                continue
            for spec, key, record in routed:
                if spec is not USER_UPDATES:
                    sinks.send(Output(spec, key, _json(record)))
                    continue
                partition = packer.partition(key)
                if local is not None and local.owns(partition):
                    mine.append((cast(UserUpdate, record), event.message))
                else:
                    sinks.send_all(packer.add(Output(spec, key, _json(record)), partition))
        sinks.send_all(packer.drain())
        if mine and local is not None:
            await local.apply(mine)
