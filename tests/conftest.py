"""Shared fixtures: a fresh embedded broker per test (it starts in milliseconds) and settings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.broker import EmbeddedBroker
from infra.kafka import provision_topics
from infra.settings import Settings, load_settings

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


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
