"""Shared fixtures: a fresh embedded broker per test (it starts in milliseconds) and settings."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from infra.broker import EmbeddedBroker
from infra.kafka import consumer_config, group_progress, producer_config, provision_topics
from infra.settings import Settings, load_settings
from schemas.topics import DEAD_LETTER, RECOMMENDATIONS, topic_for_type
from streams.spawn import spawn_worker, stop_process

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CATALOGUE_TS = 1_700_000_000_000
KINDS = ("star maps and telescopes", "chemistry glassware", "microscope slides")


def catalogue(count: int) -> list[dict]:
    """``count`` item events in three kinds (``i0``, ``i3``, ... are telescopes), ids ``i<n>``."""
    return [
        {
            "type": "item",
            "event_id": f"item-{n}",
            "ts": CATALOGUE_TS,
            "item_id": f"i{n}",
            "title": f"Item {n}: {KINDS[n % 3]}",
            "description": f"A {KINDS[n % 3]} product, model {n}.",
            "categories": [KINDS[n % 3]],
        }
        for n in range(count)
    ]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """A Tansu broker on a free loopback port, stopped by pid when the test ends."""
    with EmbeddedBroker(log_file=tmp_path / "broker.log") as running:
        yield running


@pytest.fixture
def settings(broker: EmbeddedBroker, tmp_path: Path) -> Settings:
    """Settings pointing at the test's broker, with every topic provisioned (1 partition)."""
    built = load_settings(
        data_dir=tmp_path / "data",
        kafka={"bootstrap_servers": broker.bootstrap_servers, "partitions": 1},
    )
    provision_topics(built.kafka)
    return built


class Stack:
    """A real worker (role all) in a subprocess against the test's broker, with helpers."""

    GROUP = "recstream"  # the worker's consumer group (its Faust app id)

    def __init__(self, settings: Settings, workdir: Path, **env: str) -> None:
        self.settings = settings
        self.log_path = workdir / "worker.log"
        self.proc = spawn_worker(
            settings,
            self.log_path,
            **{"RECSTREAM_STREAM__WEB_PORT": "0", "RECSTREAM_DEVICE": "cpu", **env},
        )
        self.producer = Producer(producer_config(settings.kafka))
        self.reader = Consumer(
            consumer_config(settings.kafka, "test-reader", **{"enable.auto.commit": False})
        )
        self.reader.assign(
            [
                TopicPartition(t.name, p, OFFSET_BEGINNING)
                for t in (RECOMMENDATIONS, DEAD_LETTER)
                for p in range(settings.kafka.partitions)
            ]
        )
        self.recommendations: list[dict] = []
        self.dead_letters: list[dict] = []

    def publish(self, *events: dict) -> None:
        """Send event dicts to their topics, keyed as producers key them."""

        for event in events:
            spec = topic_for_type(event["type"])
            self.publish_raw(spec.name, event[spec.key], json.dumps(event).encode())

    def publish_raw(self, topic: str, key: str, value: bytes) -> None:
        self.producer.produce(topic, key=key.encode(), value=value)
        assert self.producer.flush(10) == 0

    def wait_committed(self, topic: str, count: int, timeout_s: float = 120.0) -> None:
        """Block until the worker has committed ``count`` messages of ``topic``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.assert_alive()
            try:
                done, _ = group_progress(self.settings.kafka, self.GROUP, topic)
            except Exception:  # noqa: BLE001 - the group may not exist yet; keep polling
                done = 0
            if done >= count:
                return
            time.sleep(0.5)
        raise AssertionError(f"worker committed fewer than {count} of {topic}; log:\n{self.log()}")

    def _drain(self, timeout_s: float) -> None:
        message = self.reader.poll(timeout_s)
        while message is not None:
            if not message.error():
                body = json.loads(message.value())
                target = (
                    self.dead_letters if body["type"] == "dead_letter" else self.recommendations
                )
                target.append(body)
            message = self.reader.poll(0)

    def wait_for(self, predicate, what: str, timeout_s: float = 90.0) -> dict:
        """The first recommendation or dead letter satisfying ``predicate``."""

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for body in self.recommendations + self.dead_letters:
                if predicate(body):
                    return body
            self.assert_alive()
            self._drain(0.5)
        raise AssertionError(f"no {what} within {timeout_s} s; log:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def assert_alive(self) -> None:
        assert self.proc.poll() is None, f"worker exited:\n{self.log()}"

    def stop(self) -> None:
        """Stop the worker by pid: SIGTERM, then SIGKILL."""

        self.reader.close()
        stop_process(self.proc)


@pytest.fixture
def stack(settings: Settings, tmp_path: Path) -> Iterator[Stack]:
    """A running worker against a fresh broker; stopped when the test ends."""
    running = Stack(settings, tmp_path)
    try:
        yield running
    finally:
        running.stop()
