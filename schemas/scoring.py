"""How a recommendation is scored: the rules offline evaluation and the online evaluator share.

A list is judged by the user's next interaction with a *different* item (a review right after the
purchase of the same item is the same interaction, not a new choice). Metrics take the list's
items in rank order and the one target item.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

#: Event types that are interactions with an item (and so can be a target).
INTERACTION_TYPES = frozenset({"view", "click", "add_to_cart", "purchase", "rating", "review"})


def rank_of(ranked: Sequence[str], target: str, k: int) -> int | None:
    """1-based rank of ``target`` within the first ``k`` items, or None."""
    for pos, item in enumerate(ranked[:k], start=1):
        if item == target:
            return pos
    return None


def hit(ranked: Sequence[str], target: str, k: int) -> float:
    """HR@K for one target (equal to Recall@K when there is one relevant item)."""
    return 1.0 if rank_of(ranked, target, k) is not None else 0.0


def ndcg(ranked: Sequence[str], target: str, k: int) -> float:
    """NDCG@K for one relevant item: 1 / log2(rank + 1), 0 outside the top K."""
    rank = rank_of(ranked, target, k)
    return 0.0 if rank is None else 1.0 / math.log2(rank + 1)


def mrr(ranked: Sequence[str], target: str, k: int) -> float:
    """MRR@K for one relevant item: 1 / rank, 0 outside the top K."""
    rank = rank_of(ranked, target, k)
    return 0.0 if rank is None else 1.0 / rank


@dataclass(frozen=True, slots=True)
class Step:
    """One interaction of a user, in event-time order."""

    user_id: str
    item_id: str
    event_id: str
    ts: int


@dataclass(frozen=True, slots=True)
class Target:
    """An interaction to score, and the user's previous interaction (whose list is judged)."""

    step: Step
    previous: Step


def next_targets(steps: Iterable[Step]) -> Iterator[Target]:
    """Each interaction that has a previous one by the same user on a different item.

    ``steps`` must be in event-time order. An interaction with the same item as the user's
    previous one is not a target (and does not become the new ``previous`` either).
    """
    last: dict[str, Step] = {}
    for step in steps:
        prev = last.get(step.user_id)
        if prev is not None and prev.item_id == step.item_id:
            continue
        if prev is not None:
            yield Target(step, prev)
        last[step.user_id] = step
