"""Re-ranking, pure: fuse similarity, co-visitation and popularity, filter, diversify, explain.

Input is plain data (vectors, payload titles, scores); no store or broker is touched here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from models.state import VERBS, Interaction, ReviewRef

POPULARITY_WEIGHT = 0.05
MAX_REASONS = 2
POOL_FACTOR = 4
POPULAR_REASON = "popular with other people right now"


@dataclass(frozen=True, slots=True)
class ItemInfo:
    """An item as the ranker sees it: unit vector and display fields."""

    item_id: str
    vector: np.ndarray
    title: str
    available: bool = True


@dataclass(frozen=True, slots=True)
class Ranked:
    item_id: str
    score: float
    reasons: list[str]


@dataclass(slots=True)
class RankInput:
    """One user's ranking problem."""

    query: np.ndarray | None
    history: Sequence[Interaction]
    reviews: Sequence[ReviewRef]
    exclude: set[str]
    similar: Mapping[str, float]  # item -> cosine similarity to the query (retrieved)
    covisit: Mapping[str, float] = field(default_factory=dict)  # item -> [0, 1]
    covisit_source: Mapping[str, str] = field(default_factory=dict)  # item -> history item
    popular: Mapping[str, float] = field(default_factory=dict)  # item -> [0, 1]
    scores: Mapping[str, float] | None = None  # a trained re-ranker's scores (replace the sum)
    lead: Mapping[str, str] = field(default_factory=dict)  # item -> reason kind to put first


@dataclass(frozen=True, slots=True)
class Weights:
    covisit: float = 0.35
    mmr_lambda: float = 0.8


def _quote(title: str, limit: int = 60) -> str:
    return f"“{title if len(title) <= limit else title[: limit - 1] + '…'}”"


def _base_scores(inp: RankInput, items: Mapping[str, ItemInfo], w: Weights) -> dict[str, float]:
    if inp.scores is not None:
        return {
            i: s
            for i, s in inp.scores.items()
            if i not in inp.exclude and (info := items.get(i)) is not None and info.available
        }
    candidates = [
        i
        for i in dict.fromkeys([*inp.similar, *inp.covisit, *inp.popular])
        if i not in inp.exclude and (info := items.get(i)) is not None and info.available
    ]
    sims = dict(inp.similar)
    unscored = [i for i in candidates if i not in sims]  # co-visited or popular, not retrieved
    if unscored:  # one product for all of them
        if inp.query is None:
            sims.update(dict.fromkeys(unscored, 0.0))
        else:
            found = np.stack([items[i].vector for i in unscored]) @ inp.query
            sims.update(zip(unscored, found.tolist(), strict=True))
    covisit, popular = inp.covisit, inp.popular
    return {
        i: sims[i] + w.covisit * covisit.get(i, 0.0) + POPULARITY_WEIGHT * popular.get(i, 0.0)
        for i in candidates
    }


def top_order(values: np.ndarray, key: Callable[[int], str], n: int) -> list[int]:
    """Positions of the ``n`` best ``values`` by (-value, key): numpy finds the boundary value,
    and only the positions at or above it are sorted in Python (ties at the boundary included,
    so the order is exactly that of sorting everything)."""
    total = len(values)
    if total <= n:
        near: Iterable[int] = range(total)
    else:
        bound = np.partition(values, total - n)[total - n]
        near = np.flatnonzero(values >= bound).tolist()
    scores = values.tolist()
    return sorted(near, key=lambda j: (-scores[j], key(j)))[:n]


def _top(scores: Mapping[str, float], n: int) -> list[str]:
    """The ``n`` best items by (-score, item id)."""
    keys = list(scores)
    values = np.fromiter(scores.values(), dtype=np.float64, count=len(keys))
    return [keys[j] for j in top_order(values, keys.__getitem__, n)]


def mmr_order(relevance: np.ndarray, vectors: np.ndarray, k: int, lam: float) -> list[int]:
    """Maximal marginal relevance over a pool in score order (rows of ``vectors``): trade each
    next item's relevance against its nearest pick; the positions picked, in order."""
    if not len(relevance) or lam >= 1.0:  # no diversity term: the pool is already in order
        return list(range(min(k, len(relevance))))
    rel = np.asarray(relevance, dtype=np.float64)
    spread = float(rel.max() - rel.min())  # relevance on [0, 1], so lambda means the same for
    rel = (rel - rel.min()) / spread if spread > 0 else np.ones_like(rel)  # any score scale
    gain, cost = lam * rel, 1.0 - lam
    value = gain.copy()  # the first pick has no penalty
    nearest = np.full(len(rel), -np.inf)
    chosen: list[int] = []
    for _ in range(min(k, len(rel))):
        best = int(np.argmax(value))
        chosen.append(best)
        np.maximum(nearest, vectors @ vectors[best], out=nearest)
        np.subtract(gain, cost * nearest, out=value)
        value[chosen] = -np.inf
    return chosen


def mmr_select(
    scores: Mapping[str, float], items: Mapping[str, ItemInfo], k: int, lam: float
) -> list[str]:
    """Maximal marginal relevance over the best ``POOL_FACTOR * k`` items by score."""
    pool = _top(scores, max(k * POOL_FACTOR, k))
    if not pool or lam >= 1.0:
        return pool[:k]
    vecs = np.stack([items[i].vector for i in pool])
    rel = np.array([scores[i] for i in pool])
    return [pool[i] for i in mmr_order(rel, vecs, k, lam)]


def explain(
    item: ItemInfo,
    inp: RankInput,
    items: Mapping[str, ItemInfo],
    review_vectors: Mapping[str, np.ndarray],
) -> list[str]:
    """Human-readable reasons, strongest first: history item, review, co-visitation, popularity.

    When a trained re-ranker says which signal lifted the item most (``inp.lead``), the reason of
    that kind comes first.
    """
    return explain_all([item], inp, items, review_vectors)[0]


def explain_all(
    picked: Sequence[ItemInfo],
    inp: RankInput,
    items: Mapping[str, ItemInfo],
    review_vectors: Mapping[str, np.ndarray],
) -> list[list[str]]:
    """:func:`explain` for each of ``picked``, with one matrix product per kind of reason."""
    if not picked:
        return []
    kinds: dict[str, str] = {}
    strongest: dict[str, float] = {}
    for inter in inp.history:  # the strongest interaction per item gives the verb
        if inter.weight > strongest.get(inter.item_id, 0.0):
            strongest[inter.item_id] = inter.weight
            kinds[inter.item_id] = inter.kind
    mat = np.stack([p.vector for p in picked])
    hist = [h for h in kinds if h in items]
    hist_sims = mat @ np.stack([items[h].vector for h in hist]).T if hist else None
    closest: list[float] = []
    named: list[str] = []  # the closest history item; of equals, the greatest id
    if hist_sims is not None:
        peak = hist_sims.max(axis=1, keepdims=True)
        by_id = np.empty(len(hist), np.intp)
        by_id[sorted(range(len(hist)), key=hist.__getitem__)] = np.arange(len(hist))
        tied_best = np.where(hist_sims == peak, by_id, -1).argmax(axis=1)
        closest, named = peak[:, 0].tolist(), [hist[j] for j in tied_best.tolist()]
    refs = [r for r in inp.reviews if r.key in review_vectors]
    rev_sims = (mat @ np.stack([review_vectors[r.key] for r in refs]).T).tolist() if refs else None
    out = []
    for n, item in enumerate(picked):
        found: list[tuple[float, str, str]] = []
        if named:
            h = named[n]
            verb = VERBS.get(kinds[h], "viewed")
            found.append((closest[n], "history", f"because you {verb} {_quote(items[h].title)}"))
        if rev_sims is not None:
            for ref, sim in zip(refs, rev_sims[n], strict=True):
                about = items[ref.item_id].title if ref.item_id in items else ref.item_id
                text = f"close to your review of {_quote(about)}: {_quote(ref.snippet, 40)}"
                found.append((sim, "history", text))
        source = inp.covisit_source.get(item.item_id)
        if source and inp.covisit.get(item.item_id, 0.0) > 0.0 and source in items:
            strength = 0.5 + 0.5 * inp.covisit[item.item_id]
            text = f"often viewed together with {_quote(items[source].title)}"
            found.append((strength, "covisit", text))
        lead = inp.lead.get(item.item_id)
        if lead == "popular" or not found:
            found.insert(0, (np.inf, "popular", POPULAR_REASON))
        found.sort(key=lambda r: (r[1] != lead, -r[0]))
        out.append(list(dict.fromkeys(text for _, _, text in found))[:MAX_REASONS])
    return out


def rank(
    inp: RankInput,
    items: Mapping[str, ItemInfo],
    review_vectors: Mapping[str, np.ndarray],
    k: int,
    weights: Weights,
) -> list[Ranked]:
    """The top ``k`` items for one user, diversified, each with at least one reason."""
    scores = _base_scores(inp, items, weights)
    picked = mmr_select(scores, items, k, weights.mmr_lambda)
    reasons = explain_all([items[i] for i in picked], inp, items, review_vectors)
    return [Ranked(i, round(scores[i], 6), why) for i, why in zip(picked, reasons, strict=True)]
