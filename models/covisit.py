"""Streaming co-visitation counts (item -> items seen near it) and popularity, as pure functions.

When a user interacts with item b after items a1..an, each pair (a_i, b) within ``window`` steps is
counted in both directions. Each item keeps at most ``cap`` neighbours (the most counted).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

Neighbours = dict[str, float]

DEFAULT_WINDOW = 3
DEFAULT_CAP = 100


def covisit_pairs(
    before: Sequence[str], item: str, window: int = DEFAULT_WINDOW
) -> list[tuple[str, str]]:
    """Pairs (a, b) and (b, a) of ``item`` with each of the ``window`` latest distinct items."""
    pairs: list[tuple[str, str]] = []
    seen: set[str] = {item}
    for prev in reversed(before):
        if prev in seen:
            continue
        seen.add(prev)
        pairs.extend(((prev, item), (item, prev)))
        if len(seen) > window:
            break
    return pairs


def add_counts(
    neigh: Mapping[str, float] | None, others: Iterable[str], cap: int = DEFAULT_CAP
) -> Neighbours:
    """A neighbour map with one more count for each of ``others``, trimmed to ``cap`` entries."""
    out: Neighbours = dict(neigh or {})
    for other in others:
        out[other] = out.get(other, 0.0) + 1.0
    if len(out) > 2 * cap:
        out = dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0]))[:cap])
    return out


def covisit_scores(
    neighbours: Mapping[str, Mapping[str, float]],
    recent: Sequence[tuple[str, float]],
    limit: int | None = None,
) -> tuple[dict[str, float], dict[str, str]]:
    """Candidate scores in [0, 1] from the recent items' neighbours, and each one's top source.

    ``recent`` holds (item id, weight) pairs; a candidate's raw score is the weighted sum of its
    co-visitation counts with those items, normalised per source item by that item's total count.
    ``limit``: keep only the best ``limit`` candidates (and any tied with the last of them);
    five sources of up to 200 neighbours each would otherwise hand the ranker a thousand.
    """
    raw: dict[str, float] = {}
    best: dict[str, float] = {}
    source: dict[str, str] = {}
    for item, weight in recent:
        neigh = neighbours.get(item)
        if not neigh or weight <= 0:
            continue
        scale = weight / sum(neigh.values())
        for other, count in neigh.items():
            contribution = count * scale
            before = raw.get(other)
            raw[other] = contribution if before is None else before + contribution
            if contribution > best.get(other, 0.0):
                best[other] = contribution
                source[other] = item
    if not raw:
        return {}, {}
    if limit is not None and len(raw) > limit:
        values = np.fromiter(raw.values(), dtype=np.float64, count=len(raw))
        bound = np.partition(values, len(values) - limit)[len(values) - limit]
        raw = {k: v for k, v in raw.items() if v >= bound}
    top = max(raw.values())
    return {k: v / top for k, v in raw.items()}, {k: source[k] for k in raw if k in source}


def bump_popularity(
    popular: Mapping[str, float] | None, items: Iterable[str], decay: float = 0.999, cap: int = 200
) -> dict[str, float]:
    """Exponentially decayed item popularity: every new interaction ages the old counts."""
    batch = list(items)
    n = len(batch)
    out = {k: v * decay**n for k, v in (popular or {}).items()}
    for j, item in enumerate(batch):
        out[item] = out.get(item, 0.0) + decay ** (n - 1 - j)
    if len(out) > 2 * cap:
        out = dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0]))[:cap])
    return out
