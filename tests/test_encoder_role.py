"""The encoder role on its own: `recstream worker --role encoder` beside an ingest worker on the
embedded broker, as its own consumer group, storing vectors in Qdrant Edge with the real encoder
and dead-lettering what it cannot read."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from infra.kafka import consumer_config, group_progress, producer_config
from infra.settings import Settings
from infra.vectors import open_vector_store
from models.encoder import TextEncoder
from schemas.topics import DEAD_LETTER, ENCODE_REQUESTS, USER_UPDATES, topic_for_type
from streams.encode import text_hash
from streams.spawn import spawn_worker, stop_process

pytestmark = pytest.mark.stack

ITEMS = [
    {
        "type": "item",
        "event_id": "it-1",
        "item_id": "kettle",
        "title": "Kettle",
        "description": "A steel kettle that boils a litre in two minutes.",
    },
    {
        "type": "item",
        "event_id": "it-2",
        "item_id": "novel",
        "title": "Novel",
        "description": "A space opera about a generation ship.",
    },
]
REVIEW = {
    "type": "review",
    "event_id": "rv-1",
    "user_id": "ann",
    "item_id": "kettle",
    "text": "Boils fast and pours cleanly.",
}


def _read(settings: Settings, topic: str, until, timeout_s: float = 90.0) -> list[dict]:
    """Messages of ``topic`` from the start until ``until(messages)`` holds."""
    reader = Consumer(
        consumer_config(settings.kafka, f"t-{topic}", **{"enable.auto.commit": False})
    )
    reader.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    got: list[dict] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and not until(got):
            message = reader.poll(0.5)
            if message is not None and not message.error():
                got.append(json.loads(message.value()))
    finally:
        reader.close()
    return got


def test_encoder_role_is_its_own_group_stores_vectors_and_dead_letters_bad_requests(
    settings: Settings, tmp_path: Path
) -> None:
    """Items and a review go through an ingest worker to a separate encoder worker (consumer
    group recstream-encoder), which stores both items and the review with their text hashes,
    announces the review once its vector is stored, and sends an unreadable encode request to
    the dead-letter topic with its original bytes, stage encode-text."""
    workers = [
        spawn_worker(
            settings,
            tmp_path / f"{role}.log",
            role,
            RECSTREAM_STREAM__WEB_PORT="0",
            RECSTREAM_DEVICE="cpu",
        )
        for role in ("ingest", "encoder")
    ]
    producer = Producer(producer_config(settings.kafka))
    try:
        for event in [*ITEMS, REVIEW]:
            spec = topic_for_type(event["type"])
            producer.produce(
                spec.name, key=event[spec.key].encode(), value=json.dumps(event).encode()
            )
        producer.produce(ENCODE_REQUESTS.name, key=b"x", value=b"{broken")
        assert producer.flush(10) == 0

        updates = _read(
            settings,
            USER_UPDATES.name,
            lambda got: any(u["kind"] == "review_embedded" for u in got),
        )
        letters = _read(settings, DEAD_LETTER.name, lambda got: len(got) >= 1)
        deadline = time.monotonic() + 60
        done = 0
        while time.monotonic() < deadline and done < 4:
            done, _ = group_progress(settings.kafka, "recstream-encoder", ENCODE_REQUESTS.name)
            time.sleep(0.5)
        for proc in workers:
            assert proc.poll() is None, (tmp_path / "encoder.log").read_text()[-3000:]
    finally:
        for proc in workers:
            stop_process(proc)

    assert done == 4  # three requests and the broken one, committed by the encoder's own group
    embedded = [u for u in updates if u["kind"] == "review_embedded"]
    assert [(u["event_id"], u["user_id"], u["item_id"]) for u in embedded] == [
        ("rv-1", "ann", "kettle")
    ]
    (letter,) = letters
    assert (letter["stage"], letter["topic"]) == ("encode-text", ENCODE_REQUESTS.name)
    assert base64.b64decode(letter["payload_b64"]) == b"{broken"

    encoder = TextEncoder(device="cpu")
    store = open_vector_store(settings)
    try:
        items = store.retrieve("items", ["kettle", "novel"])
        assert store.count("reviews") == 1
    finally:
        store.close()
    text = "Kettle. A steel kettle that boils a litre in two minutes."
    assert items["kettle"].payload["text_hash"] == text_hash(encoder.version, text)
    assert float(items["kettle"].vector @ encoder.encode([text])[0]) > 0.999
    np.testing.assert_allclose(np.linalg.norm(items["novel"].vector), 1.0, atol=1e-5)
