"""The models evaluation compares, behind one small interface.

Every model learns incrementally (``observe`` one step of one user) and ranks for a batch of
requests. The co-visitation and popularity maths are the production functions of
:mod:`models.covisit`; the ``ranker`` is the production :class:`~models.recommender.Recommender`
over a real vector store, fed exactly as the stream agent feeds it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from infra.settings import RankingSettings
from infra.vectors import VectorPoint
from infra.vectors.base import VectorStore
from models.covisit import (
    Neighbours,
    add_counts,
    bump_popularity,
    covisit_pairs,
    covisit_scores,
)
from models.evaluation.data import Interaction
from models.profiles import CATALOGUE, REVIEWS, ProfileBook, profile_point
from models.recommender import Gathered, Recommender, UserRequest, covisit_sources
from models.state import Fusion, UserState, apply_interaction, apply_review, review_key
from models.trained import TrainedModel

Step = list[Interaction]  # one interaction, or a repeat group of the same item


@dataclass(slots=True)
class Request:
    """Rank for ``user_id`` given their ``history`` (steps, oldest first), without ``exclude``."""

    user_id: str
    history: Sequence[Step]
    exclude: set[str]


class EvalModel(Protocol):
    name: str

    def observe(self, user_id: str, step: Step) -> None:
        """Learn from one step of one user (called in event-time order)."""

    def repeat(self, user_id: str, step: Step) -> None:
        """Learn from a repeat of the user's latest item (the review after a purchase): not a new
        step, but the stream still counts it in popularity and embeds its review."""

    def recommend(self, requests: Sequence[Request], k: int) -> list[list[str]]:
        """The top ``k`` item ids for each request, best first."""


def apply_step(state: UserState, step: Step, max_recent: int) -> None:
    """Apply one step's interactions (and review texts) to ``state``, as the stream does."""
    for inter in step:
        apply_interaction(
            state, inter.item_id, inter.kind, inter.ts, inter.value, max_recent=max_recent
        )
        if inter.kind == "review" and inter.text:
            apply_review(state, review_key(inter.event_id), inter.item_id, inter.text)


def learn_reviews(
    profiles: ProfileBook, reviews: Mapping[str, tuple[str, np.ndarray]], step: Step
) -> list[tuple[str, np.ndarray]]:
    """Add the step's reviews to ``profiles``; (item, new profile) for each item that changed."""
    out = []
    for inter in step:
        if inter.kind == "review" and inter.event_id in reviews:
            profile = profiles.add(inter.item_id, inter.event_id, reviews[inter.event_id][1])
            if profile is not None:
                out.append((inter.item_id, profile))
    return out


def _top(scores: Mapping[str, float], k: int, exclude: set[str]) -> list[str]:
    ranked = sorted((i for i in scores if i not in exclude), key=lambda i: (-scores[i], i))
    return ranked[:k]


class MostPop:
    """Items by how often they were interacted with (in what was observed)."""

    name = "mostpop"

    def __init__(self) -> None:
        self.counts: dict[str, int] = defaultdict(int)
        self._order: list[str] | None = None

    def observe(self, user_id: str, step: Step) -> None:
        self.counts[step[0].item_id] += 1
        self._order = None

    def repeat(self, user_id: str, step: Step) -> None:
        return  # counted once per step, as in the published protocol

    def ranking(self) -> list[str]:
        if self._order is None:
            self._order = sorted(self.counts, key=lambda i: (-self.counts[i], i))
        return self._order

    def recommend(self, requests: Sequence[Request], k: int) -> list[list[str]]:
        order = self.ranking()
        out = []
        for req in requests:
            picked: list[str] = []
            for item in order:
                if item not in req.exclude:
                    picked.append(item)
                    if len(picked) == k:
                        break
            out.append(picked)
        return out


class CoVisit:
    """Co-visitation item-kNN: neighbours of the user's last items, then popularity to fill."""

    name = "covisit"

    def __init__(self, popularity: MostPop | None = None) -> None:
        self.neighbours: dict[str, Neighbours] = {}
        self.recent: dict[str, list[str]] = defaultdict(list)
        self.popularity = popularity or MostPop()
        self._own_popularity = popularity is None

    def observe(self, user_id: str, step: Step) -> None:
        item = step[0].item_id
        before = self.recent[user_id]
        for a, b in covisit_pairs(before, item):
            self.neighbours[a] = add_counts(self.neighbours.get(a), [b])
        before.append(item)
        del before[:-50]
        if self._own_popularity:
            self.popularity.observe(user_id, step)

    def repeat(self, user_id: str, step: Step) -> None:
        return  # a repeat of the same item is no co-visit

    def recommend(self, requests: Sequence[Request], k: int) -> list[list[str]]:
        fill = self.popularity.recommend(requests, k)
        out = []
        for req, backup in zip(requests, fill, strict=True):
            sources = list(dict.fromkeys(s[0].item_id for s in reversed(req.history)))[:5]
            scores, _ = covisit_scores(self.neighbours, [(i, 1.0) for i in sources])
            picked = _top(scores, k, req.exclude)
            seen = set(picked)
            picked += [i for i in backup if i not in seen][: k - len(picked)]
            out.append(picked)
        return out


class TextKnn:
    """Encoder similarity to the mean of the user's last three items. Items without catalogue
    text are described by the reviews observed so far (:mod:`models.profiles`)."""

    name = "textknn"

    def __init__(
        self,
        item_ids: Sequence[str],
        vectors: np.ndarray,
        last: int = 3,
        *,
        reviews: Mapping[str, tuple[str, np.ndarray]] | None = None,
        textless: Iterable[str] = (),
    ) -> None:
        self.ids = list(item_ids)
        self.index = {i: n for n, i in enumerate(self.ids)}
        self.vectors = vectors.copy()
        self.last = last
        self.reviews = reviews or {}
        self.profiles = ProfileBook(textless)

    def observe(self, user_id: str, step: Step) -> None:
        for item, vector in learn_reviews(self.profiles, self.reviews, step):
            if item in self.index:
                self.vectors[self.index[item]] = vector

    def repeat(self, user_id: str, step: Step) -> None:
        self.observe(user_id, step)

    def recommend(self, requests: Sequence[Request], k: int) -> list[list[str]]:
        out: list[list[str]] = []
        for req in requests:
            recent = [
                self.index[s[0].item_id]
                for s in req.history[-self.last :]
                if s[0].item_id in self.index
            ]
            if not recent:
                out.append([])
                continue
            query = self.vectors[recent].mean(axis=0)
            scores = self.vectors @ (query / max(float(np.linalg.norm(query)), 1e-12))
            for item in req.exclude:
                if item in self.index:
                    scores[self.index[item]] = -np.inf
            top = np.argpartition(-scores, min(k, len(scores) - 1))[:k]
            top = top[np.argsort(-scores[top], kind="stable")]
            out.append([self.ids[i] for i in top if np.isfinite(scores[i])])
        return out


class Ranker:
    """The production recommender: user state, fusion query, vector store, co-visitation, MMR."""

    name = "ranker"

    def __init__(
        self,
        store: VectorStore,
        ranking: RankingSettings,
        fusion: Fusion,
        *,
        max_recent: int = 50,
        name: str = "ranker",
        model: TrainedModel | None = None,
        reviews: Mapping[str, tuple[str, np.ndarray]] | None = None,
        textless: Iterable[str] = (),
    ) -> None:
        self.name = name
        self.recommender = Recommender(store, ranking, fusion, "items", "reviews", model=model)
        self.covisit = CoVisit()
        self.popular: dict[str, float] = {}  # decayed, as the stream's popularity table
        self.max_recent = max_recent
        self.reviews = reviews or {}  # by event id: what observed reviews' vectors are
        self.profiles = ProfileBook(textless)

    @classmethod
    def build(
        cls,
        path: Path,
        *,
        item_ids: Sequence[str],
        item_vectors: np.ndarray,
        titles: Mapping[str, str],
        reviews: Mapping[str, tuple[str, np.ndarray]],
        ranking: RankingSettings,
        fusion: Fusion,
        name: str = "ranker",
        model: TrainedModel | None = None,
        textless: Iterable[str] = (),
    ) -> Ranker:
        """A ranker over an embedded store at ``path`` holding the items and review vectors;
        ``textless`` items are described by the reviews it observes."""
        from infra.vectors.edge import EdgeVectorStore

        store = EdgeVectorStore(path)
        dim = int(item_vectors.shape[1])
        store.ensure_collection("items", dim)
        store.ensure_collection("reviews", dim)
        textless = set(textless)
        points = [
            VectorPoint(
                i,
                v,
                {
                    "title": titles.get(i, i),
                    "available": True,
                    "text_source": REVIEWS if i in textless else CATALOGUE,
                },
            )
            for i, v in zip(item_ids, item_vectors, strict=True)
        ]
        for start in range(0, len(points), 1000):
            store.upsert("items", points[start : start + 1000])
        review_points = [
            VectorPoint(review_key(eid), vec, {"user_id": user})
            for eid, (user, vec) in reviews.items()
        ]
        for start in range(0, len(review_points), 1000):
            store.upsert("reviews", review_points[start : start + 1000])
        return cls(
            store, ranking, fusion, name=name, model=model, reviews=reviews, textless=textless
        )

    def observe(self, user_id: str, step: Step) -> None:
        self.covisit.observe(user_id, step)
        self.repeat(user_id, step)

    def repeat(self, user_id: str, step: Step) -> None:
        """Count the step's interactions in popularity, as the stream's table does, and give
        items without catalogue text their new review profile."""
        self.popular = bump_popularity(self.popular, [i.item_id for i in step])
        profiles = dict(learn_reviews(self.profiles, self.reviews, step))
        if profiles:
            store, items = self.recommender.store, self.recommender.items
            stored = store.retrieve(items, list(profiles), with_vectors=False)
            store.upsert(
                items,
                [profile_point(p, profiles[k], self.profiles.count(k)) for k, p in stored.items()],
            )

    def state_of(self, history: Sequence[Step]) -> UserState:
        """The user state the stream would hold after ``history``."""
        state = UserState()
        for step in history:
            apply_step(state, step, self.max_recent)
        return state

    def recommend(self, requests: Sequence[Request], k: int) -> list[list[str]]:
        lists = self.recommender.recommend(self._users(requests), self.popular)
        return [[r.item_id for r in ranked][:k] for ranked in lists]

    def gather(self, requests: Sequence[Request]) -> Gathered:
        """The trained re-ranker's candidates and signals for each request, to rank later."""
        return self.recommender.gather(self._users(requests), self.popular)

    def _users(self, requests: Sequence[Request]) -> list[UserRequest]:
        users = []
        for req in requests:
            state = self.state_of(req.history)
            state.consumed.extend(i for i in req.exclude if i not in state.consumed)
            neighbours = {
                s: n for s in covisit_sources(state) if (n := self.covisit.neighbours.get(s))
            }
            users.append(UserRequest(req.user_id, state, neighbours))
        return users
