"""Versioned event records: one envelope, typed ids, and the public JSON contract.

Field names are fixed by the event contract in docs/events.md: add fields, never rename. A breaking
change adds a new record (and a ``.v2`` topic) beside the old one.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

#: Earliest event time accepted (1990-01-01): older stamps are unit mistakes (seconds, not ms).
MIN_TS_MS = 631_152_000_000
#: How far in the future an event time may be before it is called absurd (one day of clock skew).
MAX_FUTURE_MS = 86_400_000
MAX_TEXT_CHARS = 20_000
MAX_TITLE_CHARS = 500
MAX_ID_CHARS = 256
MAX_RATING = 5.0
#: The version of the event records this reader implements (the ``.v1`` topics).
SCHEMA_VERSION = 1

#: A non-empty identifier with at least one non-space character.
Id = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS, pattern=r"\S")]

BEHAVIOR_TYPES = ("view", "click", "add_to_cart", "purchase", "rating")


def now_ms() -> int:
    """Wall-clock time in milliseconds since the epoch."""
    return time.time_ns() // 1_000_000


def new_event_id() -> str:
    """A fresh, globally unique event id."""
    return uuid.uuid4().hex


class Event(BaseModel):
    """The envelope every event carries."""

    # Unknown fields are ignored, not rejected: a producer may add a field before every reader
    # knows it (the contract grows by adding fields).
    model_config = ConfigDict(frozen=True, extra="ignore")
    topic_name: ClassVar[str] = ""

    event_id: Id = Field(default_factory=new_event_id)
    ts: int = Field(
        default_factory=now_ms,
        description="event time, ms since the epoch; from 1990-01-01 to a day after now",
        json_schema_extra={"minimum": MIN_TS_MS},
    )
    type: str
    source: str | None = Field(default=None, max_length=MAX_ID_CHARS)
    schema_version: Literal[1] | None = Field(
        default=None,
        description="the record version the producer wrote; absent means 1, any other is rejected",
    )

    @field_validator("ts")
    @classmethod
    def _ts_is_plausible(cls, value: int) -> int:
        if value < MIN_TS_MS:
            raise ValueError(
                f"timestamp {value} is before 1990-01-01; ts is milliseconds since the epoch"
            )
        if value > now_ms() + MAX_FUTURE_MS:
            raise ValueError(f"timestamp {value} is more than a day in the future")
        return value


class BehaviorEvent(Event):
    """A user did something with an item: view, click, add_to_cart, purchase or rating."""

    type: Literal["view", "click", "add_to_cart", "purchase", "rating"]
    user_id: Id
    item_id: Id
    value: float | None = Field(
        default=None,
        description="the rating, 0..5; required for type rating",
        json_schema_extra={"minimum": 0, "maximum": MAX_RATING},
    )

    @field_validator("value")
    @classmethod
    def _rating_in_range(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 <= value <= MAX_RATING:
            raise ValueError(f"rating value {value} is outside 0..{MAX_RATING:g}")
        return value

    def model_post_init(self, __context: Any) -> None:
        if self.type == "rating" and self.value is None:
            raise ValueError("a rating event needs a value")


class ReviewEvent(Event):
    """A user wrote a review of an item; its text is embedded into the user's text vector."""

    type: Literal["review"]
    user_id: Id
    item_id: Id
    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    rating: float | None = Field(default=None, ge=0.0, le=MAX_RATING)


class ItemEvent(Event):
    """An item was created or changed in the catalogue (an upsert: the latest version wins)."""

    type: Literal["item"]
    item_id: Id
    title: str = Field(min_length=1, max_length=MAX_TITLE_CHARS)
    description: str = Field(default="", max_length=MAX_TEXT_CHARS)
    categories: list[Annotated[str, StringConstraints(max_length=MAX_TITLE_CHARS)]] = Field(
        default_factory=list, max_length=64
    )
    attributes: dict[str, str | int | float | bool] = Field(default_factory=dict, max_length=64)
    available: bool = True

    def text(self) -> str:
        """The text the encoder sees: title, categories, attributes, description."""
        parts = [self.title]
        if self.categories:
            parts.append(", ".join(self.categories))
        if self.attributes:
            parts.append(", ".join(f"{k}: {v}" for k, v in sorted(self.attributes.items())))
        if self.description:
            parts.append(self.description)
        return ". ".join(parts)


class ItemRemovedEvent(Event):
    """An item left the catalogue; it is never recommended again."""

    type: Literal["item_removed"]
    item_id: Id


class ForgetUserEvent(Event):
    """Delete everything recstream keeps about a user."""

    type: Literal["forget_user"]
    user_id: Id


class RecommendedItem(BaseModel):
    """One ranked item of a recommendation, with why it is there."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    item_id: Id
    rank: int = Field(ge=1)
    score: float
    reasons: list[str] = Field(min_length=1)


class RecommendationEvent(Event):
    """A fresh ranked list for a user, emitted after an event about them."""

    type: Literal["recommendation"] = "recommendation"
    user_id: Id
    trigger_event_id: Id
    model_version: str
    latency_ms: float = Field(
        ge=0.0,
        description="ms from the broker receiving the triggering input to this list's emission",
    )
    items: list[RecommendedItem]


class DeadLetter(Event):
    """An input recstream rejected, with why and its original bytes."""

    type: Literal["dead_letter"] = "dead_letter"
    stage: str
    topic: str
    partition: int
    offset: int
    error_type: str
    error: str
    payload_b64: str


#: Inputs the ingest stage accepts, by their ``type`` field.
INPUT_TYPES: dict[str, type[Event]] = {
    **dict.fromkeys(BEHAVIOR_TYPES, BehaviorEvent),
    "review": ReviewEvent,
    "item": ItemEvent,
    "item_removed": ItemRemovedEvent,
    "forget_user": ForgetUserEvent,
}
#: Every public event record, by its ``type`` field.
ALL_TYPES: dict[str, type[Event]] = {
    **INPUT_TYPES,
    "recommendation": RecommendationEvent,
    "dead_letter": DeadLetter,
}
