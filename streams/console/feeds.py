"""The console's views of three topics, each read by a confluent-kafka consumer on its own thread.

- :class:`CatalogueFeed`: the catalogue topic from its beginning (it is compacted, so this is the
  current catalogue): the storefront's cards and the titles on recommended items.
- :class:`RecommendationFeed`: the recommendation topic from its end, fanned out to the browsers
  that watch each user, with each user's latest list kept for a browser that connects later.
- :class:`DeadLetterFeed`: the dead-letter topic from its beginning: counts by stage and reason and
  the most recent letters with their original bytes.

None of them joins a consumer group: each assigns itself every partition, so a console never
takes partitions from a worker or another console, and commits nothing.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from typing import Any

import structlog
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    Message,
)
from pydantic import ValidationError

from consumers.consumer import decode_recommendation, topic_partitions, usable
from infra.kafka import consumer_config
from infra.settings import Settings
from schemas.events import DeadLetter, ItemEvent, ItemRemovedEvent
from schemas.privacy import pseudonym_for
from schemas.serde import InvalidEvent, decode_input, parse_object
from schemas.topics import CATALOG, DEAD_LETTER, RECOMMENDATIONS, TopicSpec

log = structlog.get_logger(__name__)

#: Users whose latest list the console keeps for browsers that connect later.
LATEST_KEPT = 10_000
#: What the storefront shows of an item, and the operations page of a dead letter.
ITEM_FIELDS = {"item_id", "title", "description", "categories", "attributes", "available"}
LETTER_FIELDS = {
    *("event_id", "ts", "stage", "topic", "partition", "offset"),
    *("error_type", "error", "payload_b64"),
}
#: Lists queued for one browser before the oldest is dropped (a stalled tab must not grow memory).
SUBSCRIBER_QUEUE = 64


class TopicFeed:
    """A thread that reads one topic (every partition, no group) and hands each message on."""

    def __init__(self, settings: Settings, spec: TopicSpec, *, from_beginning: bool) -> None:
        self.spec = spec
        self._conf = consumer_config(
            settings.kafka,
            f"recstream-console-{uuid.uuid4().hex}",
            **{"enable.auto.commit": False},
        )
        self._start = OFFSET_BEGINNING if from_beginning else OFFSET_END
        self._stop = threading.Event()
        self.ready = threading.Event()  # set once the partitions are assigned
        self._thread = threading.Thread(target=self._run, name=f"console-{spec.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def handle(self, msg: Message) -> None:  # pragma: no cover - every feed overrides it
        raise NotImplementedError

    def _run(self) -> None:
        consumer = Consumer(self._conf)
        try:
            while not self._stop.is_set():
                try:
                    consumer.assign(topic_partitions(consumer, self.spec.name, self._start))
                    break
                except Exception as exc:  # noqa: BLE001 - the broker or topic may not be there yet
                    log.warning("console_feed_waiting", topic=self.spec.name, error=str(exc))
                    self._stop.wait(2.0)
            self.ready.set()
            while not self._stop.is_set():
                msg = usable(consumer.poll(0.2))
                if msg is None:
                    continue
                try:
                    self.handle(msg)
                except Exception:  # one odd message must not stop the page
                    log.exception("console_feed_message_failed", topic=self.spec.name)
        finally:
            consumer.close()


class CatalogueFeed(TopicFeed):
    """Every item of the catalogue topic, latest version first wins; removals drop the item."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, CATALOG, from_beginning=True)
        self._items: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def handle(self, msg: Message) -> None:
        # Decoded as ingest decodes it, so the storefront shows exactly the items the stream has.
        envelope = {"event_id": f"{msg.topic()}-{msg.partition()}-{msg.offset()}", **_stamp(msg)}
        try:
            event = decode_input(msg.value(), topic=msg.topic(), defaults=envelope)
        except InvalidEvent:
            return  # ingest dead-letters it: the stream has no such item either
        with self._lock:
            if isinstance(event, ItemRemovedEvent):
                self._items.pop(event.item_id, None)
            elif isinstance(event, ItemEvent):
                self._items[event.item_id] = event.model_dump(mode="json", include=ITEM_FIELDS)

    def items(self) -> list[dict[str, Any]]:
        with self._lock:
            return [self._items[k] for k in sorted(self._items)]

    def describe(self, item_id: str) -> dict[str, Any] | None:
        with self._lock:
            return self._items.get(item_id)


Subscriber = tuple[asyncio.AbstractEventLoop, asyncio.Queue[dict[str, Any]]]


class RecommendationFeed(TopicFeed):
    """New recommendation lists, pushed to the asyncio queues of the browsers watching each user.

    With ``privacy.pseudonym_key`` set, lists carry pseudonyms: a browser watching a raw id is
    registered under its pseudonym, as :class:`consumers.consumer.RecommendationConsumer` does.
    """

    def __init__(self, settings: Settings, catalogue: CatalogueFeed) -> None:
        super().__init__(settings, RECOMMENDATIONS, from_beginning=False)
        self._key = settings.privacy.pseudonym_key_bytes()
        self._catalogue = catalogue
        self._latest: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._watchers: dict[str, list[Subscriber]] = {}
        self._lock = threading.Lock()

    def published_id(self, user_id: str) -> str:
        """The id the user's events and lists carry on the topics."""
        return pseudonym_for(user_id, self._key) if self._key else user_id

    def handle(self, msg: Message) -> None:
        event = decode_recommendation(msg)
        if event is None:
            return
        body = self.enrich(event.model_dump(mode="json"), "stream")
        with self._lock:
            self._latest[event.user_id] = body
            self._latest.move_to_end(event.user_id)
            while len(self._latest) > LATEST_KEPT:
                self._latest.popitem(last=False)
            watchers = list(self._watchers.get(event.user_id, ()))
        for loop, queue in watchers:
            loop.call_soon_threadsafe(offer, queue, body)

    def enrich(self, body: dict[str, Any], source: str) -> dict[str, Any]:
        """A list as the storefront shows it: each item with its title and categories."""
        for item in body.get("items", []):
            known = self._catalogue.describe(item["item_id"]) or {}
            item["title"] = known.get("title", item["item_id"])
            item["categories"] = known.get("categories", [])
        body["source"] = source
        return body

    def latest(self, user_id: str) -> dict[str, Any] | None:
        with self._lock:
            return self._latest.get(self.published_id(user_id))

    def watch(self, user_id: str) -> tuple[asyncio.Queue[dict[str, Any]], Callable[[], None]]:
        """A queue that receives the user's new lists, and the function that stops it."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(SUBSCRIBER_QUEUE)
        key = self.published_id(user_id)
        entry = (loop, queue)
        with self._lock:
            self._watchers.setdefault(key, []).append(entry)

        def unwatch() -> None:
            with self._lock:
                left = [w for w in self._watchers.get(key, []) if w is not entry]
                if left:
                    self._watchers[key] = left
                else:
                    self._watchers.pop(key, None)

        return queue, unwatch


def offer(queue: asyncio.Queue[dict[str, Any]], body: dict[str, Any]) -> None:
    """Queue a list for a browser, dropping its oldest if it has fallen behind."""
    if queue.full():
        queue.get_nowait()
    queue.put_nowait(body)


class DeadLetterFeed(TopicFeed):
    """Dead letters counted by stage and reason; the newest kept with their original bytes."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, DEAD_LETTER, from_beginning=True)
        self._counts: Counter[tuple[str, str]] = Counter()
        self._recent: deque[dict[str, Any]] = deque(maxlen=settings.console.dead_letters_kept)
        self._lock = threading.Lock()

    def handle(self, msg: Message) -> None:
        try:
            letter = DeadLetter.model_validate(parse_object(msg.value() or b""))
        except (InvalidEvent, ValidationError):  # a letter we cannot read is still a letter
            letter = DeadLetter.model_validate(
                {
                    "event_id": f"{msg.topic()}:{msg.partition()}:{msg.offset()}",
                    **_stamp(msg),
                    "stage": "unknown",
                    "topic": msg.topic(),
                    "partition": msg.partition(),
                    "offset": msg.offset(),
                    "error_type": "unreadable_dead_letter",
                    "error": "the dead letter itself does not parse",
                    "payload_b64": base64.b64encode(msg.value() or b"").decode("ascii"),
                }
            )
        raw = _b64decode(letter.payload_b64)
        entry = letter.model_dump(mode="json", include=LETTER_FIELDS)
        entry["payload_text"] = raw.decode("utf-8", errors="replace")
        entry["payload_bytes"] = len(raw)
        with self._lock:
            self._counts[(letter.stage, letter.error_type)] += 1
            self._recent.appendleft(entry)

    def summary(self) -> dict[str, Any]:
        with self._lock:
            by_reason = [
                {"stage": stage, "reason": reason, "count": count}
                for (stage, reason), count in self._counts.most_common()
            ]
            return {"by_reason": by_reason, "recent": list(self._recent)}

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())


def _stamp(msg: Message) -> dict[str, int]:
    """The broker's timestamp of ``msg`` as an event's ``ts``, when it has one."""
    kind, stamp = msg.timestamp()
    return {"ts": stamp} if kind != TIMESTAMP_NOT_AVAILABLE and stamp > 0 else {}


def _b64decode(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        return text.encode("utf-8")
