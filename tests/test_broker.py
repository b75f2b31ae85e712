"""The embedded Tansu broker's lifecycle and idempotent topic provisioning against it."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

from infra.broker import BrokerStartError, EmbeddedBroker, free_port
from infra.kafka import provision_topics
from infra.settings import KafkaSettings
from schemas.topics import ALL_TOPICS, CATALOG


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _assert_gone(pid: int, port: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not _port_open(port)


def test_broker_starts_on_a_free_port_answers_and_stops_by_pid(tmp_path: Path) -> None:
    """start() binds a free loopback port and answers metadata; stop() ends its process."""
    broker = EmbeddedBroker(log_file=tmp_path / "broker.log").start()
    pid, port = broker.pid, broker.port
    try:
        assert pid is not None
        assert broker.bootstrap_servers == f"127.0.0.1:{port}"
        assert _port_open(port)
        metadata = AdminClient({"bootstrap.servers": broker.bootstrap_servers}).list_topics(
            timeout=5
        )
        assert len(metadata.brokers) == 1
    finally:
        broker.stop()
    assert broker.pid is None
    _assert_gone(pid, port)
    broker.stop()  # a second stop is a no-op


def test_starting_on_a_port_in_use_raises_naming_the_port() -> None:
    """A port something already listens on gives BrokerStartError with the port in the message."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        broker = EmbeddedBroker(port=port)
        with pytest.raises(BrokerStartError, match=f"port {port} .*already in use"):
            broker.start()
        assert broker.pid is None


def test_context_manager_stops_the_broker() -> None:
    """Leaving the with-block stops the broker's process and closes its port."""
    with EmbeddedBroker(port=free_port()) as broker:
        pid, port = broker.pid, broker.port
        assert pid is not None
        os.kill(pid, 0)  # alive inside the block
        assert _port_open(port)
    _assert_gone(pid, port)


def test_context_manager_stops_the_broker_when_the_block_raises() -> None:
    """An exception inside the with-block still stops the broker."""
    broker = EmbeddedBroker()

    def fail_inside() -> None:
        with broker:
            raise RuntimeError("boom")

    broker.start()
    pid, port = broker.pid, broker.port
    assert pid is not None
    with pytest.raises(RuntimeError, match="boom"):
        fail_inside()
    assert broker.pid is None
    _assert_gone(pid, port)


def test_provision_topics_is_idempotent_and_creates_the_catalogue(
    broker: EmbeddedBroker,
) -> None:
    """The first call creates every topic (catalogue compacted); the second creates nothing."""
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, partitions=2)
    created = provision_topics(kafka)
    assert sorted(created) == sorted(t.name for t in ALL_TOPICS)
    assert provision_topics(kafka) == []
    admin = AdminClient({"bootstrap.servers": broker.bootstrap_servers})
    topics = admin.list_topics(timeout=5).topics
    assert {t.name for t in ALL_TOPICS} <= set(topics)
    assert len(topics[CATALOG.name].partitions) == 2
    resource = ConfigResource(ResourceType.TOPIC, CATALOG.name)
    config = admin.describe_configs([resource])[resource].result(timeout=5)
    assert config["cleanup.policy"].value == "compact"


def test_provision_topics_creates_only_the_missing_ones(broker: EmbeddedBroker) -> None:
    """With some topics present, only the absent ones are created."""
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, partitions=1)
    assert provision_topics(kafka, [CATALOG]) == [CATALOG.name]
    rest = provision_topics(kafka)
    assert sorted(rest) == sorted(t.name for t in ALL_TOPICS if t is not CATALOG)
