"""BehaviorProducer: typed, validated, idempotent publishing of recstream events to their topics.

Each method builds the event record, validates it with the same code the ingest stage uses, and
produces it to the topic its ``type`` belongs on, keyed by that topic's key field. With
``privacy.pseudonym_key`` set, every event with a ``user_id`` is published under the id's keyed
pseudonym (:func:`schemas.privacy.pseudonym_for`), so no raw user id reaches Kafka. Messages are
batched by librdkafka (``linger.ms``); delivery reports are counted on :attr:`delivered` and
:attr:`failed`. Use it as a context manager (or call :meth:`close`) so that queued messages are
delivered and the connections released.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

import structlog
from confluent_kafka import KafkaError, Message, Producer

from infra.kafka import producer_config
from infra.settings import Settings
from schemas.events import Event
from schemas.privacy import pseudonym_for
from schemas.serde import encode, validate_object
from schemas.topics import topic_for_type

#: How long :meth:`BehaviorProducer.send` waits for room in a full local queue before giving up.
QUEUE_FULL_TIMEOUT_S = 60.0


class BehaviorProducer:
    """Publishes behaviour, review, catalogue and forget events (and any other event record)."""

    def __init__(
        self, settings: Settings, *, source: str | None = None, linger_ms: int = 5
    ) -> None:
        self.source = source
        self._pseudonym_key = settings.privacy.pseudonym_key_bytes()
        self.delivered = 0
        self.failed = 0
        # producer_config hashes keys like the Java client (murmur2), so events land on the
        # partitions Faust's tables expect.
        conf = producer_config(
            settings.kafka,
            **{
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": linger_ms,
                "client.id": "recstream-producer",
            },
        )
        self._producer = Producer(conf)
        self._closed = False
        self._log = structlog.get_logger(__name__)  # per instance: not cached before first use

    # -- behaviour ---------------------------------------------------------------------------

    def view(
        self, user_id: str, item_id: str, *, ts: int | None = None, event_id: str | None = None
    ) -> Event:
        """A user viewed an item."""
        return self._build("view", ts, event_id, user_id=user_id, item_id=item_id)

    def click(
        self, user_id: str, item_id: str, *, ts: int | None = None, event_id: str | None = None
    ) -> Event:
        """A user clicked an item."""
        return self._build("click", ts, event_id, user_id=user_id, item_id=item_id)

    def add_to_cart(
        self, user_id: str, item_id: str, *, ts: int | None = None, event_id: str | None = None
    ) -> Event:
        """A user put an item in their cart."""
        return self._build("add_to_cart", ts, event_id, user_id=user_id, item_id=item_id)

    def purchase(
        self, user_id: str, item_id: str, *, ts: int | None = None, event_id: str | None = None
    ) -> Event:
        """A user bought an item."""
        return self._build("purchase", ts, event_id, user_id=user_id, item_id=item_id)

    def rating(
        self,
        user_id: str,
        item_id: str,
        value: float,
        *,
        ts: int | None = None,
        event_id: str | None = None,
    ) -> Event:
        """A user rated an item (0..5)."""
        return self._build("rating", ts, event_id, user_id=user_id, item_id=item_id, value=value)

    def review(
        self,
        user_id: str,
        item_id: str,
        text: str,
        rating: float | None = None,
        *,
        ts: int | None = None,
        event_id: str | None = None,
    ) -> Event:
        """A user wrote a review of an item, optionally with a rating."""
        return self._build(
            "review", ts, event_id, user_id=user_id, item_id=item_id, text=text, rating=rating
        )

    # -- catalogue and forget ----------------------------------------------------------------

    def item(
        self,
        item_id: str,
        title: str,
        description: str = "",
        *,
        categories: Iterable[str] = (),
        attributes: Mapping[str, str | int | float | bool] | None = None,
        available: bool = True,
        ts: int | None = None,
        event_id: str | None = None,
    ) -> Event:
        """Create or update a catalogue item (the latest version wins)."""
        return self._build(
            "item",
            ts,
            event_id,
            item_id=item_id,
            title=title,
            description=description,
            categories=list(categories),
            attributes=dict(attributes or {}),
            available=available,
        )

    def remove_item(
        self, item_id: str, *, ts: int | None = None, event_id: str | None = None
    ) -> Event:
        """Take an item out of the catalogue."""
        return self._build("item_removed", ts, event_id, item_id=item_id)

    def forget_user(
        self, user_id: str, *, ts: int | None = None, event_id: str | None = None
    ) -> Event:
        """Ask recstream to delete everything it keeps about a user."""
        return self._build("forget_user", ts, event_id, user_id=user_id)

    # -- generic -----------------------------------------------------------------------------

    def send_dict(self, obj: Mapping[str, Any]) -> Event:
        """Validate a JSON-contract object and send it; :class:`InvalidEvent` if it is not valid.

        The producer's ``source`` fills an absent ``source`` field; ``event_id`` and ``ts`` are
        generated when absent. Returns the event as published (see :meth:`send`).
        """
        data = dict(obj)
        if self.source is not None and data.get("source") is None:
            data["source"] = self.source
        return self.send(validate_object(data))

    def send(self, event: Event) -> Event:
        """Produce an event record to its type's topic, keyed by that topic's key field.

        Returns the event as published: with its user id pseudonymised when a key is set.
        """
        event = self._pseudonymised(event)
        spec = topic_for_type(event.type)
        key = str(getattr(event, spec.key)).encode("utf-8")
        self._produce(spec.name, key, encode(event))
        return event

    def _pseudonymised(self, event: Event) -> Event:
        user_id = getattr(event, "user_id", None)
        if self._pseudonym_key is None or not isinstance(user_id, str):
            return event
        alias = pseudonym_for(user_id, self._pseudonym_key)
        return event if alias == user_id else event.model_copy(update={"user_id": alias})

    def _build(self, event_type: str, ts: int | None, event_id: str | None, **fields: Any) -> Event:
        obj = {"type": event_type, "ts": ts, "event_id": event_id, "source": self.source, **fields}
        return self.send_dict({k: v for k, v in obj.items() if v is not None})

    def _produce(self, topic: str, key: bytes, value: bytes) -> None:
        deadline = time.monotonic() + QUEUE_FULL_TIMEOUT_S
        while True:
            try:
                self._producer.produce(topic, value=value, key=key, on_delivery=self._on_delivery)
                break
            except BufferError:
                # The local queue is full: serve delivery reports until there is room again.
                if time.monotonic() > deadline:
                    self._log.error("queue_full", topic=topic, pending=len(self._producer))
                    raise
                self._producer.poll(0.05)
        self._producer.poll(0)

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self.delivered += 1
            return
        self.failed += 1
        key = msg.key()
        self._log.warning(
            "delivery_failed",
            topic=msg.topic(),
            key=key.decode("utf-8", "replace") if isinstance(key, bytes) else key,
            error=err.str(),
            retriable=err.retriable(),
        )

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Messages produced but not yet acknowledged (or failed)."""
        return 0 if self._closed else len(self._producer)

    def poll(self, timeout_s: float = 0.0) -> int:
        """Serve delivery reports; returns how many were served."""
        return int(self._producer.poll(timeout_s))

    def flush(self, timeout_s: float = 30.0) -> int:
        """Wait for every message to be delivered; returns how many are still undelivered."""
        remaining = int(self._producer.flush(timeout_s))
        if remaining:
            self._log.warning("flush_incomplete", undelivered=remaining, timeout_s=timeout_s)
        return remaining

    def close(self, timeout_s: float = 30.0) -> int:
        """Flush, then release the connections; returns how many messages were not delivered.

        Messages still queued after ``timeout_s`` are purged (and counted as failed).
        """
        if self._closed:
            return 0
        self._closed = True
        remaining = self.flush(timeout_s)
        if remaining:
            self._producer.purge()
            self._producer.flush(0)  # serve the purged messages' failure reports
        close = getattr(self._producer, "close", None)  # confluent-kafka >= 2.10
        if close is not None:
            close()
        return remaining

    def __enter__(self) -> BehaviorProducer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
