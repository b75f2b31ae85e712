"""Where agents write: typed outputs to our topics, and dead letters for rejected inputs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from schemas.serde import dead_letter, encode
from schemas.topics import DEAD_LETTER, TopicSpec

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Output:
    """One message to send: which topic, its key, its value bytes."""

    spec: TopicSpec
    key: str
    value: bytes


class Sinks:
    """Non-blocking sends (Faust ``send_soon``) to the topics an agent may write."""

    def __init__(self, topics: Mapping[str, Any]) -> None:
        self._topics = topics

    def send(self, out: Output) -> None:
        self._topics[out.spec.name].send_soon(key=out.key.encode(), value=out.value)

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
