"""BehaviorProducer against the embedded broker: topics, keys, ids, delivery counts, validation."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from consumers.consumer import read_topic
from infra.settings import Settings, load_settings
from producers.producer import BehaviorProducer
from schemas.events import BehaviorEvent, ItemEvent, ReviewEvent
from schemas.serde import InvalidEvent, decode_input
from schemas.topics import BEHAVIOR, CATALOG, FORGET, TopicSpec

TS = 1_700_000_000_000


def _read(settings: Settings, spec: TopicSpec) -> list[tuple[str, object]]:
    """(key, decoded event) for every message on a topic, read until it is idle for 0.5 s."""
    return [
        (msg.key().decode(), decode_input(msg.value(), spec.name))
        for msg in read_topic(settings, spec, timeout_s=0.5)
    ]


def test_typed_methods_land_on_their_topics_keyed_by_the_topic_key(settings: Settings) -> None:
    """Each typed method produces its record to its type's topic, keyed by that topic's key."""
    with BehaviorProducer(settings, source="shop") as producer:
        sent = [
            producer.view("u1", "i1", ts=TS),
            producer.click("u1", "i2"),
            producer.add_to_cart("u2", "i2"),
            producer.purchase("u2", "i2", event_id="order-17"),
            producer.rating("u1", "i1", 4.5),
            producer.review("u3", "i1", "Sturdy and precise.", rating=5),
            producer.item(
                "i9", "Pipette", "10 ul", categories=["lab", "glass"], attributes={"ml": 1}
            ),
            producer.remove_item("i8"),
            producer.forget_user("u4"),
        ]
    assert producer.delivered == 9
    assert producer.failed == 0
    assert producer.pending == 0
    assert len({event.event_id for event in sent}) == 9
    assert sent[0].ts == TS
    assert sent[3].event_id == "order-17"
    assert all(event.source == "shop" for event in sent)
    assert isinstance(sent[5], ReviewEvent)
    assert sent[5].rating == 5.0

    behavior = _read(settings, BEHAVIOR)
    assert [key for key, _ in behavior] == ["u1", "u1", "u2", "u2", "u1", "u3"]
    assert [event for _, event in behavior] == sent[:6]

    catalog = _read(settings, CATALOG)
    assert [key for key, _ in catalog] == ["i9", "i8"]
    assert [event for _, event in catalog] == sent[6:8]
    item = catalog[0][1]
    assert isinstance(item, ItemEvent)
    assert item.categories == ["lab", "glass"]
    assert item.attributes == {"ml": 1}

    assert _read(settings, FORGET) == [("u4", sent[8])]


def test_invalid_events_raise_and_are_not_produced(settings: Settings) -> None:
    """send_dict and the typed methods raise InvalidEvent for bad input and produce nothing."""
    producer = BehaviorProducer(settings)
    with pytest.raises(InvalidEvent) as missing:
        producer.send_dict({"type": "view", "user_id": "u1"})
    assert missing.value.error_type == "invalid_field"
    assert "item_id" in str(missing.value)
    with pytest.raises(InvalidEvent) as unknown:
        producer.send_dict({"type": "wishlist", "user_id": "u1", "item_id": "i1"})
    assert unknown.value.error_type == "unknown_type"
    with pytest.raises(InvalidEvent, match=r"outside 0\.\.5"):
        producer.rating("u1", "i1", 7.0)
    with pytest.raises(InvalidEvent, match="user_id"):
        producer.view("", "i1")

    good = producer.send_dict({"type": "purchase", "user_id": "u1", "item_id": "i1", "ts": TS})
    assert producer.close(10) == 0
    assert producer.delivered == 1
    assert isinstance(good, BehaviorEvent)
    assert good.ts == TS
    assert _read(settings, BEHAVIOR) == [("u1", good)]


def test_undelivered_messages_are_counted_and_logged_as_failed() -> None:
    """With no broker, close() reports the undelivered message and counts a delivery failure."""
    nowhere = load_settings(kafka={"bootstrap_servers": "127.0.0.1:1"})
    with capture_logs() as logs:
        producer = BehaviorProducer(nowhere)
        producer.view("u1", "i1")
        assert producer.close(timeout_s=0.5) == 1
    assert (producer.delivered, producer.failed) == (0, 1)
    failures = [entry for entry in logs if entry["event"] == "delivery_failed"]
    assert [(f["topic"], f["key"]) for f in failures] == [(BEHAVIOR.name, "u1")]
