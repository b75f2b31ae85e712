"""Records on recstream's internal topics (encode requests, user updates).

They are ours alone, so they may change with a version bump of their topic; the public contract is
in :mod:`schemas.events`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.events import Id


class _Internal(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    event_id: Id
    ts: int
    #: When the broker first saw the originating input (ms); latency is measured from here.
    received_ms: int


class EncodeRequest(_Internal):
    """Text to embed (an item or a review), or an item to delete from the vector store."""

    kind: Literal["item", "review", "item_removed"]
    item_id: Id
    user_id: str | None = None
    text: str = ""
    title: str = ""
    categories: list[str] = Field(default_factory=list)
    available: bool = True
    rating: float | None = None


class UserUpdate(_Internal):
    """Something that changes a user's state: behaviour, an embedded review, or forget.

    ``items_changed`` is no user's: it names items whose stored vector or payload changed, and is
    sent to every partition so each recommend worker drops them from its item table.

    ``barrier`` is no user's either: a worker that applies its own users' updates without this
    topic sends one to each partition it is assigned, and starts doing so once it has read its
    barrier back on each (:class:`streams.user_state.LocalUpdates`). ``event_id`` names the
    assignment it was sent for.
    """

    kind: Literal["behavior", "review_embedded", "forget", "items_changed", "barrier"]
    user_id: Id
    event_type: str
    item_id: str | None = None
    value: float | None = None
    review_point: str | None = None
    review_snippet: str | None = None
    item_ids: list[str] | None = None
