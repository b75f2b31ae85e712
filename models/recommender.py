"""Recommendations for a batch of users: one round of batched vector-store calls, then pure ranking.

The stream agent and offline evaluation call the same :meth:`Recommender.recommend`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat

import numpy as np

from infra.settings import RankingSettings
from infra.vectors import Filter, VectorPoint, VectorStore
from infra.vectors.cached import CachedStore
from infra.vectors.resident import ResidentIndex, ResidentView
from models.covisit import Neighbours, covisit_scores
from models.ranking import (
    POOL_FACTOR,
    POPULARITY_WEIGHT,
    ItemInfo,
    Ranked,
    RankInput,
    Weights,
    explain_all,
    mmr_order,
    rank,
    top_order,
)
from models.reranker import SIGNAL_REASON, Signals, signals
from models.state import Fusion, UserState, behaviour_vector, history_keys, text_vector
from models.trained import TrainedModel

COVISIT_SOURCES = 5
_INFO_MEMO = 200_000  # ItemInfos kept for reuse; matches the item table's default capacity


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


@dataclass(slots=True)
class _Round:
    """What every way of ranking a batch of users needs first."""

    items: dict[str, ItemInfo]  # the users' history items
    item_vecs: dict[str, np.ndarray]  # their vectors
    review_vecs: dict[str, np.ndarray]
    queries: list[np.ndarray | None]  # fusion queries f(x, z)
    excluded: list[set[str]]
    covisits: list[tuple[dict[str, float], dict[str, str]]]  # scores and sources per user
    popular: dict[str, float]  # the top popular items, scaled to [0, 1]


@dataclass(slots=True)
class Gathered:
    """A batch's candidates, item vectors and (with a model) re-ranker signals, before ranking."""

    items: dict[str, ItemInfo]
    review_vecs: dict[str, np.ndarray]
    inputs: list[RankInput]
    signals: list[Signals] | None = None


class Recommender:
    """Fusion query -> vector candidates + co-visitation + popularity -> ranked, explained lists.

    With a :class:`~models.trained.TrainedModel`, the sequential model adds its own candidates
    (known items from its vocabulary, new items through a text query to the store) and the trained
    re-ranker scores every candidate from its signals; without one, a hand-weighted sum does.
    """

    def __init__(
        self,
        store: VectorStore,
        ranking: RankingSettings,
        fusion: Fusion,
        items_collection: str,
        reviews_collection: str,
        *,
        model: TrainedModel | None = None,
    ) -> None:
        self.store = store
        self.cfg = ranking
        self.items = items_collection
        self.reviews = reviews_collection
        self.weights = Weights(covisit=ranking.covisit_weight, mmr_lambda=ranking.mmr_lambda)
        self.fallback = fusion
        self.model = model  # switch by assigning; a ``recommend`` call uses one model throughout
        self._infos: dict[str, tuple[VectorPoint, ItemInfo | None]] = {}
        # The last popularity map and its top scores: the table holds one map per batch, and
        # every ranking round until the next batch is handed that same object.
        self._popular: tuple[Mapping[str, float], dict[str, float]] = ({}, {})

    @property
    def version(self) -> str:
        return self.model.version if self.model is not None else self.fallback.version

    def _items(self, keys: Sequence[str]) -> dict[str, ItemInfo]:
        """The ranker's view of the stored items among ``keys``.

        A cached store hands back the same point object until the item changes, so each point's
        :class:`ItemInfo` is built once and reused while the point is the one stored.
        """
        points = self.store.retrieve(self.items, list(keys)) if keys else {}
        memo = self._infos
        out: dict[str, ItemInfo] = {}
        for key, point in points.items():
            seen = memo.get(key)
            if seen is not None and seen[0] is point:
                info = seen[1]
            else:
                info = _info(point)
                memo[key] = (point, info)
            if info is not None:
                out[key] = info
        if len(memo) > 2 * max(len(points), _INFO_MEMO):  # keep it near the live catalogue
            for key in list(memo)[: len(memo) // 2]:
                del memo[key]
        return out

    def recommend(
        self, requests: Sequence[UserRequest], popular: Mapping[str, float] | None = None
    ) -> list[list[Ranked]]:
        """One ranked list per request, in order; the store is called a fixed number of times."""
        if not requests:
            return []
        model = self.model  # one model for the whole batch, even if another is switched in
        index = self._resident() if model is None else None
        if index is not None:
            with index.view() as view:
                if view is not None and view.rows:
                    return self._recommend_resident(requests, popular or {}, view)
            # no matrix (off, or nothing available): the store answers, the index's lock released
        return self.rank_gathered(self._gather(requests, popular or {}, model), model)

    def rank_gathered(
        self, batch: Gathered, model: TrainedModel | None = None
    ) -> list[list[Ranked]]:
        """Rank a gathered batch: by ``model``'s re-ranker when the batch has signals (training
        fits a re-ranker on a batch's signals, then ranks the same batch with it)."""
        out = []
        for n, inp in enumerate(batch.inputs):
            if batch.signals is not None and model is not None:
                sig = batch.signals[n]
                scores = model.reranker.score(sig.values).tolist()
                inp.scores = dict(zip(sig.items, scores, strict=True))
                leads = model.reranker.lead_signal(sig.values)
                inp.lead = {i: SIGNAL_REASON[s] for i, s in zip(sig.items, leads, strict=True)}
            out.append(rank(inp, batch.items, batch.review_vecs, self.cfg.k, self.weights))
        return out

    def gather(
        self, requests: Sequence[UserRequest], popular: Mapping[str, float] | None = None
    ) -> Gathered:
        """Each request's candidates and their re-ranker signals (what training fits on)."""
        model = self.model
        if model is None:
            raise ValueError("signals need a trained model")
        return self._gather(requests, popular or {}, model)

    def _gather(
        self,
        requests: Sequence[UserRequest],
        popular: Mapping[str, float],
        model: TrainedModel | None,
    ) -> Gathered:
        """Candidates, item vectors and (with a model) signals for a batch of users."""
        prep = self._prepare(
            requests, popular, model.fusion if model is not None else self.fallback
        )
        items, queries, excluded, covisits = prep.items, prep.queries, prep.excluded, prep.covisits
        pop = prep.popular
        similar = self._similar(queries, excluded)
        wanted = {i for cs, _ in covisits for i in cs} | set(pop)
        wanted |= {i for s in similar for i in s}
        users = None
        extra: list[list[str]] = [[] for _ in requests]
        if model is not None:
            users = model.user_vectors(
                [[i.item_id for i in r.state.recent] for r in requests], prep.item_vecs
            )
            longest = max(len(e) for e in excluded)
            known = model.top_known(users, self.cfg.candidates + longest)
            new = self._similar(list(model.text_queries(users)), excluded, skip_zero=True)
            extra = [k + list(nw) for k, nw in zip(known, new, strict=True)]
            wanted |= {i for e in extra for i in e}
        items.update(self._items([i for i in wanted if i not in items]))
        inputs = [
            RankInput(q, r.state.recent, r.state.reviews, ex, sim, cs, src, pop)
            for q, r, ex, sim, (cs, src) in zip(
                queries, requests, excluded, similar, covisits, strict=True
            )
        ]
        batch = Gathered(items, prep.review_vecs, inputs)
        if model is not None and users is not None:
            vecs = {k: i.vector for k, i in items.items()}
            batch.signals = [
                self._signals(model, inp, r, u, e, items, vecs, popular)
                for inp, r, u, e in zip(inputs, requests, users, extra, strict=True)
            ]
        return batch

    def _prepare(
        self, requests: Sequence[UserRequest], popular: Mapping[str, float], fusion: Fusion
    ) -> _Round:
        """The users' history items and review vectors, fusion queries, exclusions, co-visited
        candidates, and the popular items (scaled, once per popularity map)."""
        item_keys, review_keys = history_keys([r.state for r in requests])
        reviewed = [r.item_id for req in requests for r in req.state.reviews]
        items = self._items(list(dict.fromkeys([*item_keys, *reviewed])))  # titles for reasons
        rev_points = self.store.retrieve(self.reviews, review_keys) if review_keys else {}
        review_vecs = {k: p.vector for k, p in rev_points.items() if p.vector is not None}
        item_vecs = {k: i.vector for k, i in items.items()}
        queries = [
            fusion.query(
                behaviour_vector(r.state, item_vecs, self.cfg.half_life_events),
                text_vector(r.state, review_vecs),
            )
            for r in requests
        ]
        covisits = [
            covisit_scores(
                r.neighbours,
                [(i, 1.0) for i in covisit_sources(r.state)],
                limit=2 * self.cfg.candidates,
            )
            for r in requests
        ]
        source, pop = self._popular
        if source is not popular:
            pop = self._popular_scores(popular)
            self._popular = (popular, pop)
        excluded = [r.state.exclusions(self.cfg.exclude_seen) for r in requests]
        return _Round(items, item_vecs, review_vecs, queries, excluded, covisits, pop)

    def _resident(self) -> ResidentIndex | None:
        """The store's in-memory matrix of the available items, when it keeps one for them."""
        store = self.store
        if isinstance(store, CachedStore) and store.collection == self.items:
            return store.resident
        return None

    def _recommend_resident(
        self, requests: Sequence[UserRequest], popular: Mapping[str, float], view: ResidentView
    ) -> list[list[Ranked]]:
        """:meth:`recommend` without a trained model, scored by rows of the resident matrix.

        The lists are the ones the candidate dictionaries give (the same candidates: the best
        ``candidates`` by cosine, co-visited and popular items; the same sums, MMR and reasons),
        but a candidate is a row: its cosine comes from the round's one matrix product, and no
        item is read from the store except the users' history.
        """
        prep = self._prepare(requests, popular, self.fallback)
        asked = [q for q in prep.queries if q is not None]
        cosines = iter(view.scores(asked) if asked else ())
        pop_rows, pop_values = _rows_of(view, prep.popular)
        popular_add = np.zeros(len(view.keys))  # what popularity adds to each row's score
        popular_add[pop_rows] = POPULARITY_WEIGHT * pop_values
        lists = []
        for req, query, excluded, (covisit, source) in zip(
            requests, prep.queries, prep.excluded, prep.covisits, strict=True
        ):
            cosine = next(cosines) if query is not None else None
            rows, scores = self._pick(view, cosine, covisit, excluded, pop_rows, popular_add)
            infos = [ItemInfo(view.key(r), view.matrix[r], "") for r in rows]
            inp = RankInput(
                query,
                req.state.recent,
                req.state.reviews,
                excluded,
                {},
                covisit=covisit,
                covisit_source=source,
                popular=prep.popular,
            )
            reasons = explain_all(infos, inp, prep.items, prep.review_vecs)
            lists.append(
                [
                    Ranked(info.item_id, round(score, 6), why)
                    for info, score, why in zip(infos, scores, reasons, strict=True)
                ]
            )
        return lists

    def _pick(  # noqa: PLR0917 - one call site, every argument a different part of the round
        self,
        view: ResidentView,
        cosine: np.ndarray | None,
        covisit: Mapping[str, float],
        excluded: set[str],
        pop_rows: np.ndarray,
        popular_add: np.ndarray,
    ) -> tuple[list[int], list[float]]:
        """One user's list as matrix rows and scores: the candidates (the best by ``cosine``,
        over-fetched by the exclusions; co-visited; popular) minus ``excluded``, scored as
        :func:`models.ranking.rank` scores them, the pool's best by score diversified by MMR."""
        cov_rows, cov_values = _rows_of(view, covisit)
        is_candidate = np.zeros(len(view.keys), dtype=bool)
        is_candidate[cov_rows] = True
        is_candidate[pop_rows] = True
        if cosine is not None:
            is_candidate[view.top(cosine, self.cfg.candidates + len(excluded))] = True
        if excluded:
            is_candidate[_rows_of(view, dict.fromkeys(excluded, 0.0))[0]] = False
        cand = np.flatnonzero(is_candidate)
        score = cosine[cand].astype(np.float64) if cosine is not None else np.zeros(len(cand))
        covisit_add = np.zeros(len(view.keys))
        covisit_add[cov_rows] = self.weights.covisit * cov_values
        score = score + covisit_add[cand] + popular_add[cand]  # added as the dictionaries add
        rows = cand.tolist()
        pool = top_order(
            score, lambda j: view.key(rows[j]), max(POOL_FACTOR * self.cfg.k, self.cfg.k)
        )
        order = mmr_order(score[pool], view.matrix[cand[pool]], self.cfg.k, self.weights.mmr_lambda)
        chosen = [pool[j] for j in order]
        return [rows[j] for j in chosen], score[chosen].tolist()

    @staticmethod
    def _signals(  # noqa: PLR0917 - one call site, every argument a different part of the batch
        model: TrainedModel,
        inp: RankInput,
        req: UserRequest,
        user: np.ndarray,
        extra: Sequence[str],
        items: Mapping[str, ItemInfo],
        vecs: Mapping[str, np.ndarray],
        popular: Mapping[str, float],
    ) -> Signals:
        pool = dict.fromkeys([*inp.similar, *inp.covisit, *inp.popular, *extra])
        cands = [i for i in pool if i not in inp.exclude and i in items and items[i].available]
        mat = np.stack([vecs[i] for i in cands]) if cands else np.zeros((0, 1), np.float32)
        fusion = mat @ inp.query if inp.query is not None and cands else np.zeros(len(cands))
        last = req.state.recent[-1].item_id if req.state.recent else None
        recency = (
            mat @ vecs[last]
            if last is not None and last in vecs and cands
            else np.zeros(len(cands))
        )
        sequential, text_sequential = model.item_scores(user, cands, vecs)
        return signals(
            cands,
            sequential=sequential,
            text_sequential=text_sequential,
            trained_count=model.trained_counts(cands),
            fusion=fusion,
            covisit=inp.covisit,
            last_neighbours=req.neighbours.get(last) if last else None,
            popular=popular,
            recency=recency,
        )

    def _similar(
        self,
        queries: Sequence[np.ndarray | None],
        excluded: Sequence[set[str]],
        *,
        skip_zero: bool = False,
    ) -> list[dict[str, float]]:
        """Vector candidates per query, each over-fetched by its own exclusion list."""
        asked = [
            i for i, q in enumerate(queries) if q is not None and not (skip_zero and not np.any(q))
        ]
        out: list[dict[str, float]] = [{} for _ in queries]
        if not asked:
            return out
        found = self.store.query_keys(  # vectors and titles come from the (cached) item reads
            self.items,
            [queries[i] for i in asked],  # type: ignore[misc]
            [self.cfg.candidates + len(excluded[i]) for i in asked],
            Filter(must_equal={"available": True}),
        )
        for i, scores in zip(asked, found, strict=True):
            out[i] = scores
        return out

    @staticmethod
    def _popular_scores(popular: Mapping[str, float], top: int = 50) -> dict[str, float]:
        best = sorted(popular.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
        if not best:
            return {}
        peak = best[0][1]
        return {k: v / peak for k, v in best}


def _rows_of(view: ResidentView, values: Mapping[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """The matrix rows of the held keys among ``values``, and their values, in the same order."""
    if not values:
        return np.zeros(0, np.intp), np.zeros(0)
    # map over the dict's own get: no Python frame per key (a generator costs one each)
    rows = np.fromiter(map(view.rows.get, values, repeat(-1)), dtype=np.intp, count=len(values))
    found = np.fromiter(values.values(), dtype=np.float64, count=len(values))
    held = rows >= 0
    return rows[held], found[held]
