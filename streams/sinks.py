"""Where agents write: typed outputs to our topics, and dead letters for rejected inputs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from schemas.internal import EncodeRequest, UserUpdate
from schemas.serde import dead_letter, encode
from schemas.topics import DEAD_LETTER, USER_UPDATES, TopicSpec

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Output:
    """One message to send: which topic, its key, its value bytes; the partition when the key
    must not choose it."""

    spec: TopicSpec
    key: str
    value: bytes
    partition: int | None = None


#: The key of ``items_changed`` notices (they name no user and go to every partition).
ITEMS_NOTICE_KEY = "__items__"


def items_changed(
    keys: Iterable[str], *, partitions: int, origin: EncodeRequest | UserUpdate
) -> list[Output]:
    """An ``items_changed`` notice for each partition of the user-updates topic, so every
    recommend worker, whichever partitions it holds, drops ``keys`` from its item table. The
    notice carries the ids and times of ``origin``, the request that changed them."""
    names = sorted(set(keys))
    if not names:
        return []
    value = (
        UserUpdate(
            event_id=origin.event_id,
            ts=origin.ts,
            received_ms=origin.received_ms,
            kind="items_changed",
            user_id=ITEMS_NOTICE_KEY,
            event_type="items_changed",
            item_ids=names,
        )
        .model_dump_json(exclude_none=True)
        .encode()
    )
    return [Output(USER_UPDATES, ITEMS_NOTICE_KEY, value, p) for p in range(partitions)]


class Sinks:
    """Non-blocking sends (Faust ``send_soon``) to the topics an agent may write."""

    def __init__(self, topics: Mapping[str, Any]) -> None:
        self._topics = topics

    def send(self, out: Output) -> None:
        self._topics[out.spec.name].send_soon(
            key=out.key.encode(), value=out.value, partition=out.partition
        )

    def send_all(self, outs: Iterable[Output]) -> None:
        for out in outs:
            self.send(out)

    def dead(self, *, stage: str, message: Any, exc: Exception) -> None:
        """Route a rejected input (a Faust message) to the dead-letter topic with its bytes."""
        letter = dead_letter(
            stage=stage,
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            raw=message.value,
            exc=exc,
        )
        log.warning(
            "dead_lettered",
            step=stage,
            topic=message.topic,
            offset=message.offset,
            error=letter.error_type,
        )
        self.send(Output(DEAD_LETTER, message.topic, encode(letter)))
