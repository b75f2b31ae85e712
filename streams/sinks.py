"""Where agents write: typed outputs to our topics, and dead letters for rejected inputs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import structlog
from pydantic import BaseModel, ValidationError

from schemas.internal import EncodeRequest, UserUpdate
from schemas.serde import dead_letter, encode
from schemas.topics import DEAD_LETTER, USER_UPDATES, TopicSpec
from streams.observe import dead_lettered

log = structlog.get_logger(__name__)
RecordT = TypeVar("RecordT", bound=BaseModel)


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


def _notices(
    kind: Literal["items_changed", "barrier"],
    key: str,
    partitions: Iterable[int],
    *,
    event_id: str,
    ts: int,
    received_ms: int,
    item_ids: list[str] | None = None,
) -> list[Output]:
    """One user update of ``kind`` that names no user (keyed ``key``) for each of ``partitions``
    of the user-updates topic, the same record on each."""
    value = (
        UserUpdate(
            event_id=event_id,
            ts=ts,
            received_ms=received_ms,
            kind=kind,
            user_id=key,
            event_type=kind,
            item_ids=item_ids,
        )
        .model_dump_json(exclude_none=True)
        .encode()
    )
    return [Output(USER_UPDATES, key, value, p) for p in partitions]


def items_changed(
    keys: Iterable[str], *, partitions: int, origin: EncodeRequest | UserUpdate
) -> list[Output]:
    """An ``items_changed`` notice for each partition of the user-updates topic, so every
    recommend worker, whichever partitions it holds, drops ``keys`` from its item table. The
    notice carries the ids and times of ``origin``, the request that changed them."""
    names = sorted(set(keys))
    if not names:
        return []
    return _notices(
        "items_changed",
        ITEMS_NOTICE_KEY,
        range(partitions),
        event_id=origin.event_id,
        ts=origin.ts,
        received_ms=origin.received_ms,
        item_ids=names,
    )


#: The key of ``barrier`` updates (they name no user; each goes to one chosen partition).
BARRIER_KEY = "__barrier__"


def barriers(token: str, partitions: Iterable[int], ts_ms: int) -> list[Output]:
    """A ``barrier`` update named ``token`` for each of ``partitions`` of the user-updates topic
    (see :class:`streams.user_state.LocalUpdates`)."""
    return _notices(
        "barrier", BARRIER_KEY, sorted(partitions), event_id=token, ts=ts_ms, received_ms=ts_ms
    )


def user_update_key(user_id: str) -> bytes:
    """The key of a user's messages on the user-update topic: the user id as Faust's tables
    serialise their keys (JSON).

    The user-state table writes each user to the changelog partition its serialised key hashes
    to, and Faust routes a REST request for a user by the same hash. Keying the user updates the
    same way puts a user's updates, state and requests on one partition, so one worker owns all
    three; raw keys would hash many users to another partition than their state (with more than
    one partition).
    """
    from faust.serializers import codecs  # a worker-only dependency

    return bytes(codecs.dumps("json", user_id))


def partition_of(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2, as Faust's producer and the tables'
    changelogs use) gives ``key`` among ``partitions``."""
    from aiokafka.partitioner import murmur2  # a worker-only dependency

    return (murmur2(key) & 0x7FFFFFFF) % partitions


#: Most bytes of user updates one message carries: a few hundred updates, well under Kafka's 1 MiB
#: default limit, and a bound on what `stream.buffer_maxsize` messages can hold.
PACK_BYTES = 64 * 1024


class UpdatePacker:
    """User updates bound for one partition of the user-updates topic, sent as few messages.

    A message on that topic holds one or more user updates, one JSON record per line, in the
    order they were routed (a record never holds a raw newline). One message per partition per
    batch, instead of one per update, spares the ingest hop's producer and the user-state hop's
    consumer a Kafka message each per event. Each pack goes to the partition the default
    partitioner gives its users' keys, and is keyed by its first user, so a user's updates,
    state and REST requests stay on one partition and in order.
    """

    def __init__(self, partitions: int) -> None:
        self.partitions = max(partitions, 1)
        self._packs: dict[int, tuple[str, list[bytes], int]] = {}

    def partition(self, user_id: str) -> int:
        """The partition of the user-updates topic that carries ``user_id``'s updates."""
        return partition_of(user_update_key(user_id), self.partitions)

    def add(self, out: Output, partition: int | None = None) -> list[Output]:
        """Take a user update (``partition``: its user's, when the caller knows it already);
        return the packs that filled up (to send now)."""
        if partition is None:
            partition = self.partition(out.key)
        key, lines, size = self._packs.get(partition, (out.key, [], 0))
        lines.append(out.value)
        size += len(out.value) + 1
        self._packs[partition] = (key, lines, size)
        if size < PACK_BYTES:
            return []
        del self._packs[partition]
        return [Output(USER_UPDATES, key, b"\n".join(lines), partition)]

    def drain(self) -> list[Output]:
        """Every pack not yet sent, one message per partition."""
        packs, self._packs = self._packs, {}
        return [
            Output(USER_UPDATES, key, b"\n".join(lines), partition)
            for partition, (key, lines, _) in sorted(packs.items())
        ]


@dataclass(frozen=True, slots=True)
class Part:
    """One record of a message that carries several (see :class:`UpdatePacker`): where it came
    from and its own bytes, for a dead letter that names only it."""

    topic: str
    partition: int
    offset: int
    timestamp: float
    value: bytes


class Sinks:
    """Non-blocking sends (Faust ``send_soon``) to the topics an agent may write."""

    def __init__(self, topics: Mapping[str, Any]) -> None:
        self._topics = topics

    def send(self, out: Output) -> None:
        key = user_update_key(out.key) if out.spec is USER_UPDATES else out.key.encode()
        self._topics[out.spec.name].send_soon(key=key, value=out.value, partition=out.partition)

    def send_all(self, outs: Iterable[Output]) -> None:
        for out in outs:
            self.send(out)

    def parse(
        self, events: Iterable[Any], model: type[RecordT], *, stage: str, lines: bool = False
    ) -> list[tuple[RecordT, Any]]:
        """Each Faust event's message validated as ``model``, with the message; a message that
        does not validate goes to the dead-letter topic with its reason and bytes.

        ``lines``: a message may hold several records, one per line (:class:`UpdatePacker`);
        each is validated alone and comes with a :class:`Part` in place of the message, so a
        record that does not validate is dead-lettered alone, with its own bytes."""
        parsed = []
        for event in events:
            message = event.message
            value = message.value
            if lines and value and b"\n" in value:
                where = (message.topic, message.partition, message.offset, message.timestamp)
                parts: list[tuple[Any, Any]] = [
                    (line, Part(*where, line)) for line in value.split(b"\n")
                ]
            else:
                parts = [(value, message)]
            for raw, origin in parts:
                try:
                    parsed.append((model.model_validate_json(raw), origin))
                except ValidationError as exc:
                    self.dead(stage=stage, message=origin, exc=exc)
        return parsed

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
        dead_lettered(stage, letter.error_type)
        log.warning(
            "dead_lettered",
            step=stage,
            event_id=letter.event_id,  # the dead letter's own id on the dead-letter topic
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            error=letter.error_type,
        )
        self.send(Output(DEAD_LETTER, message.topic, encode(letter)))
