"""The topic catalogue: every topic recstream reads or writes, declared once, with its version.

Nothing else in the code base spells a topic name; it imports these specs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """A topic's name (with its version), partition key, cleanup policy and purpose."""

    name: str
    key: str
    cleanup: Literal["delete", "compact"]
    internal: bool
    description: str

    def config(self) -> dict[str, str]:
        """Topic-level configuration for provisioning."""
        return {"cleanup.policy": self.cleanup}


BEHAVIOR = TopicSpec(
    "behavior.events.v1",
    "user_id",
    "delete",
    False,
    "views, clicks, carts, purchases, ratings and reviews, keyed by user",
)
CATALOG = TopicSpec(
    "catalog.items.v1",
    "item_id",
    "compact",
    False,
    "item upserts and removals, keyed by item; compacted so it holds the current catalogue",
)
FORGET = TopicSpec(
    "users.forget.v1",
    "user_id",
    "delete",
    False,
    "requests to forget a user, keyed by user",
)
RECOMMENDATIONS = TopicSpec(
    "recommendations.v1",
    "user_id",
    "delete",
    False,
    "ranked, explained recommendation lists, keyed by user",
)
DEAD_LETTER = TopicSpec(
    "dead-letter.v1",
    "topic",
    "delete",
    False,
    "every rejected input with its stage, reason and original bytes",
)
ENCODE_REQUESTS = TopicSpec(
    "recstream.encode-requests.v1",
    "item_id",
    "delete",
    True,
    "item and review text for the encoder worker, keyed by item (or review) id",
)
USER_UPDATES = TopicSpec(
    "recstream.user-updates.v1",
    "user_id",
    "delete",
    True,
    "validated behaviour, embedded reviews and forget requests, keyed by user",
)

#: Public input topics, in the order ingest reads them.
INPUT_TOPICS: tuple[TopicSpec, ...] = (BEHAVIOR, CATALOG, FORGET)
ALL_TOPICS: tuple[TopicSpec, ...] = (
    BEHAVIOR,
    CATALOG,
    FORGET,
    RECOMMENDATIONS,
    DEAD_LETTER,
    ENCODE_REQUESTS,
    USER_UPDATES,
)

_TYPE_TO_TOPIC = {
    "view": BEHAVIOR,
    "click": BEHAVIOR,
    "add_to_cart": BEHAVIOR,
    "purchase": BEHAVIOR,
    "rating": BEHAVIOR,
    "review": BEHAVIOR,
    "item": CATALOG,
    "item_removed": CATALOG,
    "forget_user": FORGET,
    "recommendation": RECOMMENDATIONS,
    "dead_letter": DEAD_LETTER,
}


def topic_for_type(event_type: str) -> TopicSpec:
    """The topic an event of this ``type`` belongs on; ``KeyError`` for an unknown type."""
    return _TYPE_TO_TOPIC[event_type]


def by_name(name: str) -> TopicSpec:
    """The spec of a topic by its full name; ``KeyError`` if it is not one of ours."""
    for spec in ALL_TOPICS:
        if spec.name == name:
            return spec
    raise KeyError(name)
