"""Recommendations for a batch of users: one round of batched vector-store calls, then pure ranking.

The stream agent and offline evaluation call the same :meth:`Recommender.recommend`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from infra.settings import RankingSettings
from infra.vectors import Filter, VectorPoint, VectorStore
from models.covisit import Neighbours, covisit_scores
from models.ranking import ItemInfo, Ranked, RankInput, Weights, rank
from models.state import Fusion, UserState, behaviour_vector, history_keys, text_vector

COVISIT_SOURCES = 5


@dataclass(slots=True)
class UserRequest:
    """One user to recommend for: their state and the co-visitation maps of their recent items."""

    user_id: str
    state: UserState
    neighbours: Mapping[str, Neighbours]


def covisit_sources(state: UserState, n: int = COVISIT_SOURCES) -> list[str]:
    """The user's last ``n`` distinct items, whose co-visitation neighbours are candidates."""
    out: list[str] = []
    for inter in reversed(state.recent):
        if inter.item_id not in out:
            out.append(inter.item_id)
        if len(out) == n:
            break
    return out


def _info(point: VectorPoint) -> ItemInfo | None:
    if point.vector is None:
        return None
    p = point.payload
    return ItemInfo(
        point.key, point.vector, str(p.get("title") or point.key), bool(p.get("available", True))
    )


class Recommender:
    """Fusion query -> vector candidates + co-visitation + popularity -> ranked, explained lists."""

    def __init__(
        self,
        store: VectorStore,
        ranking: RankingSettings,
        fusion: Fusion,
        items_collection: str,
        reviews_collection: str,
    ) -> None:
        self.store = store
        self.cfg = ranking
        self.fusion = fusion
        self.items = items_collection
        self.reviews = reviews_collection
        self.weights = Weights(covisit=ranking.covisit_weight, mmr_lambda=ranking.mmr_lambda)

    def _items(self, keys: Sequence[str]) -> dict[str, ItemInfo]:
        points = self.store.retrieve(self.items, list(keys)) if keys else {}
        return {k: info for k, p in points.items() if (info := _info(p)) is not None}

    def recommend(
        self, requests: Sequence[UserRequest], popular: Mapping[str, float] | None = None
    ) -> list[list[Ranked]]:
        """One ranked list per request, in order; the store is called a fixed number of times."""
        if not requests:
            return []
        item_keys, review_keys = history_keys([r.state for r in requests])
        items = self._items(item_keys)
        rev_points = self.store.retrieve(self.reviews, review_keys) if review_keys else {}
        review_vecs = {k: p.vector for k, p in rev_points.items() if p.vector is not None}
        item_vecs = {k: i.vector for k, i in items.items()}
        queries = [
            self.fusion.query(
                behaviour_vector(r.state, item_vecs, self.cfg.half_life_events),
                text_vector(r.state, review_vecs),
            )
            for r in requests
        ]
        excluded = [r.state.exclusions(self.cfg.exclude_seen) for r in requests]
        similar = self._similar(queries, excluded)
        covisits = [
            covisit_scores(r.neighbours, [(i, 1.0) for i in covisit_sources(r.state)])
            for r in requests
        ]
        pop = self._popular_scores(popular or {})
        wanted = {i for cs, _ in covisits for i in cs} | set(pop)
        wanted |= {i for s in similar for i in s}
        items.update(self._items([i for i in wanted if i not in items]))
        return [
            rank(
                RankInput(
                    q,
                    r.state.recent,
                    r.state.reviews,
                    ex,
                    sim,
                    cs,
                    src,
                    pop,
                ),
                items,
                review_vecs,
                self.cfg.k,
                self.weights,
            )
            for q, r, ex, sim, (cs, src) in zip(
                queries, requests, excluded, similar, covisits, strict=True
            )
        ]

    def _similar(
        self, queries: Sequence[np.ndarray | None], excluded: Sequence[set[str]]
    ) -> list[dict[str, float]]:
        """Vector candidates per query, over-fetched by the longest exclusion list."""
        asked = [i for i, q in enumerate(queries) if q is not None]
        out: list[dict[str, float]] = [{} for _ in queries]
        if not asked:
            return out
        longest = max(len(excluded[i]) for i in asked)
        hits = self.store.query_batch(
            self.items,
            [queries[i] for i in asked],  # type: ignore[misc]
            self.cfg.candidates + longest,
            Filter(must_equal={"available": True}),
        )
        for i, found in zip(asked, hits, strict=True):
            out[i] = {h.key: h.score for h in found}
        return out

    @staticmethod
    def _popular_scores(popular: Mapping[str, float], top: int = 50) -> dict[str, float]:
        best = sorted(popular.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
        if not best:
            return {}
        peak = best[0][1]
        return {k: v / peak for k, v in best}
