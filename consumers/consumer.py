"""Reading recstream topics: RecommendationConsumer for recommendations, read_topic for any topic.

RecommendationConsumer decodes ``recommendations.v1`` into :class:`RecommendationEvent` records,
optionally for one user, and drops repeats of a (user, trigger event) pair that at-least-once
delivery can produce. With ``privacy.pseudonym_key`` set, the user's raw id is mapped to the
pseudonym the producer published it under.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from types import TracebackType

import structlog
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaError,
    Message,
    TopicPartition,
)
from pydantic import ValidationError

from infra.kafka import consumer_config
from infra.settings import Settings
from schemas.events import RecommendationEvent
from schemas.privacy import pseudonym_for
from schemas.serde import InvalidEvent, parse_object
from schemas.topics import RECOMMENDATIONS, TopicSpec

log = structlog.get_logger(__name__)

#: How many recent (user, trigger event) pairs are remembered for de-duplication.
DEDUPE_WINDOW = 10_000
_METADATA_TIMEOUT_S = 10.0
#: How long a group member waits for its first partitions before idle time starts counting anyway.
GROUP_JOIN_TIMEOUT_S = 30.0


def topic_partitions(consumer: Consumer, topic: str, offset: int) -> list[TopicPartition]:
    """Every partition of ``topic`` at ``offset``; ``KeyError`` if the topic does not exist."""
    meta = consumer.list_topics(topic, timeout=_METADATA_TIMEOUT_S).topics.get(topic)
    if meta is None or meta.error is not None or not meta.partitions:
        raise KeyError(f"topic {topic} does not exist")
    return [TopicPartition(topic, p, offset) for p in sorted(meta.partitions)]


def usable(msg: Message | None) -> Message | None:
    """The message, or None for an empty poll or an error event (errors are logged)."""
    if msg is None:
        return None
    err = msg.error()
    if err is None:
        return msg
    if err.code() != KafkaError._PARTITION_EOF:
        log.warning("consumer_error", topic=msg.topic(), error=err.str(), fatal=err.fatal())
    return None


def read_topic(
    settings: Settings,
    spec: TopicSpec,
    *,
    timeout_s: float,
    max_messages: int | None = None,
    group_id: str | None = None,
) -> Iterator[Message]:
    """Messages of a topic from the beginning until none arrives for ``timeout_s`` seconds.

    Without ``group_id`` every partition is assigned directly from offset 0 (no group join, no
    commits). With ``group_id`` the consumer joins that group and continues from its committed
    offsets (or the beginning), committing as it reads; the idle time counts from the join.
    """
    private = group_id is None
    conf = consumer_config(
        settings.kafka,
        group_id or f"recstream-read-{uuid.uuid4().hex}",
        **{"enable.auto.commit": not private},
    )
    consumer = Consumer(conf)
    assigned = threading.Event()
    try:
        if private:
            consumer.assign(topic_partitions(consumer, spec.name, OFFSET_BEGINNING))
            assigned.set()
        else:
            consumer.subscribe([spec.name], on_assign=lambda *_: assigned.set())
        count = 0
        last = time.monotonic()
        join_deadline = last + GROUP_JOIN_TIMEOUT_S
        while max_messages is None or count < max_messages:
            msg = usable(consumer.poll(min(0.5, timeout_s)))
            now = time.monotonic()
            if msg is None:
                if not assigned.is_set() and now < join_deadline:
                    last = now  # the idle clock starts once the group has given us partitions
                elif now - last >= timeout_s:
                    return
                continue
            last = now
            count += 1
            yield msg
    finally:
        consumer.close()


def decode_recommendation(msg: Message) -> RecommendationEvent | None:
    """A recommendation message as its record, or None (with a ``decode_failed`` warning)."""
    try:
        return RecommendationEvent.model_validate(parse_object(msg.value() or b""))
    except InvalidEvent as exc:
        error, error_type = str(exc), exc.error_type
    except ValidationError as exc:
        error, error_type = str(exc.errors(include_url=False)[:3]), "invalid_field"
    log.warning(
        "decode_failed",
        topic=msg.topic(),
        partition=msg.partition(),
        offset=msg.offset(),
        error=error_type,
        detail=error[:300],
    )
    return None


class RecommendationConsumer:
    """An iterator over recommendation events, optionally for one user, without repeats.

    Without ``group_id`` the consumer uses a private group (``recstream-tail-<uuid>``) and assigns
    itself every partition directly, so it starts at once and never takes partitions from another
    tail. With ``group_id`` it joins that group (partitions are shared, offsets committed).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        user_id: str | None = None,
        group_id: str | None = None,
        from_beginning: bool = True,
        dedupe_window: int = DEDUPE_WINDOW,
    ) -> None:
        key = settings.privacy.pseudonym_key_bytes()
        self.user_id = pseudonym_for(user_id, key) if user_id is not None and key else user_id
        self.group_id = group_id or f"recstream-tail-{uuid.uuid4().hex}"
        self.duplicates = 0
        self.undecodable = 0
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._window = dedupe_window
        private = group_id is None
        conf = consumer_config(
            settings.kafka,
            self.group_id,
            **{
                "enable.auto.commit": not private,
                "auto.offset.reset": "earliest" if from_beginning else "latest",
            },
        )
        self._consumer = Consumer(conf)
        self._closed = False
        if private:
            start = OFFSET_BEGINNING if from_beginning else OFFSET_END
            self._consumer.assign(topic_partitions(self._consumer, RECOMMENDATIONS.name, start))
        else:
            self._consumer.subscribe([RECOMMENDATIONS.name])

    def poll(self, timeout_s: float) -> RecommendationEvent | None:
        """The next new recommendation (for the user, if one was given) or None after timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            msg = usable(self._consumer.poll(min(left, 1.0)))
            if msg is None:
                continue
            event = decode_recommendation(msg)
            if event is None:
                self.undecodable += 1
            elif self._accept(event):
                return event

    def _accept(self, event: RecommendationEvent) -> bool:
        if self.user_id is not None and event.user_id != self.user_id:
            return False
        key = (event.user_id, event.trigger_event_id)
        if key in self._seen:
            self._seen.move_to_end(key)
            self.duplicates += 1
            return False
        self._seen[key] = None
        if len(self._seen) > self._window:
            self._seen.popitem(last=False)
        return True

    def take(self, n: int, timeout_s: float) -> list[RecommendationEvent]:
        """Up to ``n`` recommendations, returning early once ``timeout_s`` has passed in all."""
        deadline = time.monotonic() + timeout_s
        events: list[RecommendationEvent] = []
        while len(events) < n:
            event = self.poll(max(0.0, deadline - time.monotonic()))
            if event is None:
                break
            events.append(event)
        return events

    def __iter__(self) -> Iterator[RecommendationEvent]:
        while True:
            event = self.poll(1.0)
            if event is not None:
                yield event

    def close(self) -> None:
        """Leave the group (if any) and release the connection; calling it again does nothing."""
        if not self._closed:
            self._closed = True
            self._consumer.close()

    def __enter__(self) -> RecommendationConsumer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
