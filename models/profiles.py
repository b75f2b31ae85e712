"""Items without catalogue text are described by their reviews.

Some catalogues carry nothing but an item's id: the Amazon review dumps, for one, name an item by
its ASIN and nothing else. Encoding "B0002E1G5C" says nothing about a guitar string, so such an
item's text vector is its *review profile*: the unit-length mean of the vectors of the reviews
written about it so far, at most :data:`PROFILE_REVIEWS` of them. Until its first review the item
keeps the vector of its own text (the id). An item with real catalogue text always keeps its text's
vector: the catalogue describes the item; a review is one person's view of it.

Only reviews that have arrived count, so the profile never holds text from the future: the stream
rebuilds a profile from the reviews collection after each batch of reviews (and after a user is
forgotten, from the reviews that remain); evaluation and training add reviews as they observe them.

The item point's payload says which it is: ``text_source`` is ``"catalogue"`` or ``"reviews"``,
and ``reviews`` counts the reviews the vector averages.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from infra.vectors import VectorPoint, VectorStore

PROFILE_REVIEWS = 1000
CATALOGUE, REVIEWS = "catalogue", "reviews"


def text_source(text: str, item_id: str) -> str:
    """``"reviews"`` when the item's text is nothing but its id (or empty), else ``"catalogue"``."""
    return REVIEWS if text.strip() in ("", item_id) else CATALOGUE


def review_profile(vectors: Sequence[np.ndarray]) -> np.ndarray | None:
    """The unit-length mean of review vectors; None for none (or vectors that cancel out)."""
    if not len(vectors):
        return None
    mean = np.mean(np.asarray(vectors, dtype=np.float64), axis=0)
    norm = float(np.linalg.norm(mean))
    return (mean / norm).astype(np.float32) if norm > 1e-9 else None


class ProfileBook:
    """Review profiles kept in memory, for evaluation and training, which see reviews one by one
    (the stream keeps none: it reads the reviews collection)."""

    def __init__(self, textless: Iterable[str]) -> None:
        self.textless = set(textless)
        self._reviews: dict[str, dict[str, np.ndarray]] = {}

    def add(self, item_id: str, review: str, vector: np.ndarray) -> np.ndarray | None:
        """Count one review (by key: a repeat replaces it); the item's new profile, or None when
        the item has catalogue text or the review limit is reached."""
        if item_id not in self.textless:
            return None
        seen = self._reviews.setdefault(item_id, {})
        if review not in seen and len(seen) >= PROFILE_REVIEWS:
            return None
        seen[review] = vector
        return review_profile(list(seen.values()))

    def count(self, item_id: str) -> int:
        return len(self._reviews.get(item_id, {}))


def profile_point(point: VectorPoint, profile: np.ndarray, reviews: int) -> VectorPoint:
    """The stored item ``point`` with its vector replaced by ``profile`` of ``reviews`` reviews.
    Its text hash is cleared: the vector no longer encodes the item's text, so the next request
    for that text is encoded, not skipped."""
    payload = {k: v for k, v in point.payload.items() if k != "key"}
    return VectorPoint(point.key, profile, {**payload, "reviews": reviews, "text_hash": ""})


def refresh_profiles(
    store: VectorStore, items: str, reviews: str, item_ids: Iterable[str]
) -> list[VectorPoint]:
    """Rebuild the vectors of the review-described items among ``item_ids`` from the reviews now
    in the store; returns the stored points of those left with no review (their vector should be
    their own text's)."""
    wanted = list(dict.fromkeys(item_ids))
    points = store.retrieve(items, wanted) if wanted else {}
    updated, bare = [], []
    for key, point in points.items():
        if point.payload.get("text_source") != REVIEWS:
            continue
        found = store.points_where(reviews, "item_id", key, limit=PROFILE_REVIEWS)
        profile = review_profile([p.vector for p in found if p.vector is not None])
        if profile is None:
            if point.payload.get("reviews"):
                bare.append(point)
            continue
        updated.append(profile_point(point, profile, len(found)))
    store.upsert(items, updated)
    return bare


def with_profiles(
    ids: Sequence[str],
    vectors: np.ndarray,
    textless: Iterable[str],
    reviews: Iterable[tuple[str, str, np.ndarray]],
) -> np.ndarray:
    """``vectors`` (rows follow ``ids``) with each textless item's row replaced by the profile of
    its ``reviews`` (item id, review key, vector), taken in order up to the review limit."""
    book = ProfileBook(textless)
    index = {item: n for n, item in enumerate(ids)}
    out = vectors.copy()
    for item, key, vector in reviews:
        profile = book.add(item, key, vector)
        if profile is not None and item in index:
            out[index[item]] = profile
    return out
