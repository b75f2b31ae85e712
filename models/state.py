"""Per-user state and the seeds' fusion f(x, z) = x W1 + z W2, as pure functions over plain data.

The state keeps ids, kinds and times only (vectors stay in the vector store), so it stays small and
JSON-serialisable for a Faust table. The behaviour vector x is a recency-decayed, kind-weighted mean
of the vectors of the user's recent items; the text vector z is the mean of their review vectors.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: How much each kind of behaviour says about taste.
KIND_WEIGHTS: dict[str, float] = {
    "view": 1.0,
    "click": 2.0,
    "add_to_cart": 3.0,
    "purchase": 5.0,
    "review": 4.0,
}
#: One letter per kind in a stored state (a kind without a letter makes the state store names).
KIND_CODES: dict[str, str] = {
    "view": "v",
    "click": "c",
    "add_to_cart": "a",
    "purchase": "p",
    "rating": "r",
    "review": "w",
}
KIND_NAMES = {code: kind for kind, code in KIND_CODES.items()}
#: Kinds after which an item is never recommended again to the same user.
CONSUMED_KINDS = frozenset({"purchase", "review", "rating"})
MAX_CONSUMED = 500
MAX_REVIEWS = 10
SNIPPET_CHARS = 60
#: Event ids remembered per user for de-duplication, in two blocks of this many: between 32 and
#: 64 of the user's latest events are recognised by id when they arrive again.
SEEN_BLOCK = 32
#: Characters of one remembered event id: 30 bits of its BLAKE2b hash, in URL-safe base64.
SEEN_CHARS = 5

VERBS = {
    "view": "viewed",
    "click": "clicked",
    "add_to_cart": "added to your cart",
    "purchase": "bought",
    "rating": "rated",
    "review": "reviewed",
}


def kind_weight(kind: str, value: float | None = None) -> float:
    """Weight of one interaction; a rating counts by how much above 2.5 stars it is."""
    if kind == "rating":
        return max(0.0, ((value if value is not None else 2.5) - 2.5) * 2.0)
    return KIND_WEIGHTS.get(kind, 1.0)


@dataclass(slots=True)
class Interaction:
    item_id: str
    kind: str
    ts: int
    weight: float


def review_key(event_id: str) -> str:
    """The vector-store key of a review: deterministic, so a replay overwrites, never duplicates.

    The encoder stores a review's vector under it and the user state refers to it.
    """
    return f"review:{event_id}"


@dataclass(slots=True)
class ReviewRef:
    """A review of the user's whose vector is in the reviews collection under ``key``."""

    key: str
    item_id: str
    snippet: str


def event_hash(event_id: str) -> str:
    """The short fingerprint of an event id that :class:`Seen` remembers."""
    digest = hashlib.blake2b(event_id.encode("utf-8"), digest_size=4).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii")[:SEEN_CHARS]


@dataclass(slots=True)
class Seen:
    """Which of a user's behaviour events were already applied, so a redelivered or replayed
    event is not counted twice.

    The latest event ids are kept as fingerprints in two blocks of :data:`SEEN_BLOCK`: ``current``
    fills up, then becomes ``previous`` and the old ``previous`` is dropped. Dropping a block moves
    ``horizon`` up to the newest event time it could have held (the user's latest event time when
    it filled), and an event older than the horizon counts as seen: it is either a repeat of a
    forgotten event or a straggler older than the user's last 32 to 64 events.
    """

    current: str = ""  # fingerprints, SEEN_CHARS each, oldest first
    previous: str = ""
    previous_ts: int = 0  # the user's latest event time when ``previous`` filled
    horizon: int = 0  # events older than this count as seen

    def __contains__(self, event: tuple[str, int]) -> bool:
        event_id, ts = event
        if ts < self.horizon:
            return True
        mark = event_hash(event_id)
        for block in (self.current, self.previous):
            at = block.find(mark)
            while at >= 0:
                if at % SEEN_CHARS == 0:  # a whole fingerprint, not one straddling two
                    return True
                at = block.find(mark, at + 1)
        return False

    def add(self, event_id: str, last_ts: int) -> None:
        """Remember an applied event; ``last_ts`` is the user's latest event time after it."""
        self.current += event_hash(event_id)
        if len(self.current) >= SEEN_BLOCK * SEEN_CHARS:
            if self.previous:
                self.horizon = max(self.horizon, self.previous_ts)
            self.previous, self.previous_ts, self.current = self.current, last_ts, ""

    def to_list(self) -> list[Any]:
        return [self.current, self.previous, self.previous_ts, self.horizon]

    def copy(self) -> Seen:
        return Seen(self.current, self.previous, self.previous_ts, self.horizon)

    @classmethod
    def from_list(cls, data: Sequence[Any] | None) -> Seen:
        if not data:
            return cls()
        current, previous, previous_ts, horizon = data
        return cls(str(current), str(previous), int(previous_ts), int(horizon))


@dataclass(slots=True)
class UserState:
    """What recstream remembers about one user."""

    recent: list[Interaction] = field(default_factory=list)  # oldest first
    consumed: list[str] = field(default_factory=list)  # bought, reviewed or rated
    reviews: list[ReviewRef] = field(default_factory=list)  # oldest first
    events: int = 0
    last_ts: int = 0
    last_event_id: str = ""  # the newest behaviour event applied: what a fresh list reflects
    seen: Seen = field(default_factory=Seen)  # applied event ids, for de-duplication

    def to_dict(self) -> dict[str, Any]:
        """The table record: compact plain data (see :data:`KIND_CODES`).

        Recent interactions are stored as columns, item ids, one letter per kind and times as
        offsets back from ``last_ts``; weights are stored only when one differs from its kind's
        default (a rating). This is what sits in the changelog and the table for every user, so
        its size is the per-user memory figure (``benchmarks/memory.py``).
        """
        kinds = [r.kind for r in self.recent]
        codes = "".join(KIND_CODES.get(k, "?") for k in kinds)
        out: dict[str, Any] = {
            "i": [r.item_id for r in self.recent],
            "k": kinds if "?" in codes else codes,
            "t": [self.last_ts - r.ts for r in self.recent],
            "n": self.events,
            "l": self.last_ts,
        }
        if any(r.weight != kind_weight(r.kind) for r in self.recent):
            out["w"] = [r.weight for r in self.recent]
        if self.consumed:
            out["c"] = list(self.consumed)
        if self.reviews:
            out["r"] = [[r.key, r.item_id, r.snippet] for r in self.reviews]
        if self.last_event_id:
            out["e"] = self.last_event_id
        if self.seen.current or self.seen.previous:
            out["s"] = self.seen.to_list()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> UserState:
        """A state from :meth:`to_dict`'s record, or from the earlier field-by-field record."""
        if not data:
            return cls()
        if "recent" in data or "events" in data:
            return cls._from_fields(data)
        last_ts = int(data["l"])
        kinds = data["k"]
        names = [KIND_NAMES[c] for c in kinds] if isinstance(kinds, str) else list(kinds)
        weights = data.get("w") or [kind_weight(k) for k in names]
        return cls(
            recent=[
                Interaction(item, kind, last_ts - back, float(weight))
                for item, kind, back, weight in zip(
                    data["i"], names, data["t"], weights, strict=True
                )
            ],
            consumed=list(data.get("c", [])),
            reviews=[ReviewRef(key, item, snippet) for key, item, snippet in data.get("r", [])],
            events=int(data["n"]),
            last_ts=last_ts,
            last_event_id=str(data.get("e", "")),
            seen=Seen.from_list(data.get("s")),
        )

    @classmethod
    def _from_fields(cls, data: Mapping[str, Any]) -> UserState:
        return cls(
            recent=[Interaction(**r) for r in data.get("recent", [])],
            consumed=list(data.get("consumed", [])),
            reviews=[ReviewRef(**r) for r in data.get("reviews", [])],
            events=int(data.get("events", 0)),
            last_ts=int(data.get("last_ts", 0)),
            last_event_id=str(data.get("last_event_id", "")),
        )

    def copy(self) -> UserState:
        """A state that shares nothing mutable with this one (its interactions and review
        references are never changed in place, only replaced), for the next batch to change
        while this one may still be ranked on another thread."""
        return UserState(
            list(self.recent),
            list(self.consumed),
            list(self.reviews),
            self.events,
            self.last_ts,
            self.last_event_id,
            self.seen.copy(),
        )

    def exclusions(self, exclude_seen: bool) -> set[str]:
        """Items not to recommend: consumed ones always, every recent one if ``exclude_seen``."""
        out = set(self.consumed)
        if exclude_seen:
            out.update(i.item_id for i in self.recent)
        return out


def apply_interaction(
    state: UserState, item_id: str, kind: str, ts: int, value: float | None, *, max_recent: int
) -> list[str]:
    """Record one behaviour event; return the user's earlier recent items (for co-visitation).

    A repeat of the user's latest item (a review right after the purchase, a click after a view)
    updates that interaction, keeping the stronger kind, instead of counting the item twice.
    It does not de-duplicate: the stream checks :attr:`UserState.seen` first.
    """
    weight = kind_weight(kind, value)
    last = state.recent[-1] if state.recent else None
    if last is not None and last.item_id == item_id:
        before = [i.item_id for i in state.recent[:-1]]
        stronger = weight >= last.weight
        state.recent[-1] = Interaction(  # replaced, not changed: a copy may share it
            item_id,
            kind if stronger else last.kind,
            max(last.ts, ts),
            weight if stronger else last.weight,
        )
    else:
        before = [i.item_id for i in state.recent]
        state.recent.append(Interaction(item_id, kind, ts, weight))
        del state.recent[:-max_recent]
    if kind in CONSUMED_KINDS and item_id not in state.consumed:
        state.consumed.append(item_id)
        del state.consumed[:-MAX_CONSUMED]
    state.events += 1
    state.last_ts = max(state.last_ts, ts)
    return before


def apply_review(state: UserState, key: str, item_id: str, snippet: str) -> bool:
    """Remember an embedded review of the user's (its vector is stored under ``key``); return
    whether the state changed. A review announced again (a redelivery, a replayed log) keeps its
    place."""
    ref = ReviewRef(key, item_id, snippet[:SNIPPET_CHARS])
    for n, known in enumerate(state.reviews):
        if known.key == key:
            state.reviews[n] = ref
            return known != ref
    state.reviews.append(ref)
    del state.reviews[:-MAX_REVIEWS]
    return True


def behaviour_vector(
    state: UserState, vectors: Mapping[str, np.ndarray], half_life_events: float
) -> np.ndarray | None:
    """x: recency-decayed, kind-weighted mean of the recent items' vectors (None if none known)."""
    known: list[np.ndarray] = []
    weights: list[float] = []
    newest = len(state.recent) - 1
    for pos, inter in enumerate(state.recent):
        vec = vectors.get(inter.item_id)
        if vec is None or inter.weight <= 0.0:
            continue
        known.append(vec)
        weights.append(inter.weight * 0.5 ** ((newest - pos) / half_life_events))
    total = sum(weights)
    if not known or total == 0.0:
        return None
    return (np.asarray(weights, dtype=np.float32) @ np.stack(known)) / np.float32(total)


def text_vector(state: UserState, vectors: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """z: mean of the user's review vectors (None if none is known)."""
    found = [vectors[r.key] for r in state.reviews if r.key in vectors]
    return np.mean(found, axis=0) if found else None


def _unit(vec: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vec))
    return vec / norm if norm > 0 else vec


Weight = np.ndarray | float


def _apply(vec: np.ndarray, weight: Weight) -> np.ndarray:
    return vec * weight if np.ndim(weight) == 0 else vec @ weight


@dataclass(frozen=True)
class Fusion:
    """f(x, z) = x W1 + z W2. Untrained, W1 = a and W2 = 1 - a (scalars): a weighted mean.

    Trained weights are ``(dim, dim)`` matrices; the untrained ones fit any embedding width.
    """

    w1: Weight
    w2: Weight
    version: str = "untrained"

    @classmethod
    def untrained(cls, behaviour_weight: float) -> Fusion:
        return cls(float(behaviour_weight), float(1.0 - behaviour_weight))

    @classmethod
    def load(cls, path: Path) -> Fusion:
        data = np.load(path)
        version = str(data["version"]) if "version" in data else path.stem
        return cls(data["w1"].astype(np.float32), data["w2"].astype(np.float32), version)

    def save(self, path: Path) -> None:
        np.savez(
            path, w1=np.asarray(self.w1), w2=np.asarray(self.w2), version=np.array(self.version)
        )

    def query(self, x: np.ndarray | None, z: np.ndarray | None) -> np.ndarray | None:
        """The unit query vector; a missing part contributes nothing."""
        parts = [_apply(v, w) for v, w in ((x, self.w1), (z, self.w2)) if v is not None]
        if not parts:
            return None
        return _unit(np.asarray(sum(parts), dtype=np.float32))


def history_keys(states: Sequence[UserState]) -> tuple[list[str], list[str]]:
    """Every recent item id and review key the given states refer to (deduplicated, ordered)."""
    items = dict.fromkeys(i.item_id for s in states for i in s.recent)
    reviews = dict.fromkeys(r.key for s in states for r in s.reviews)
    return list(items), list(reviews)
