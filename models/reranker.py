"""The learned re-ranker: a linear score over a few signals per candidate, fitted on validation
events with a listwise softmax (the held-out item against every other candidate of its list).

The signals, each computed the same way in training, offline evaluation and the stream:

- ``sequential``: the sequential model's cosine between the user and the item;
- ``fusion``: the cosine between the fusion query f(x, z) and the item's text vector;
- ``covisit``: co-visitation with the user's last few items (normalised per list);
- ``covisit_last``: the share of the latest item's co-visitation count that goes to this item;
- ``popularity``: decayed popularity, log-scaled, relative to the most popular item;
- ``recency``: text similarity to the user's latest item (what they are looking at now).

There is deliberately no "new item" signal: validation lists would teach it that items nobody has
touched yet are rarely the next one, and new items would be pushed down for being new. A new item
competes on its text (the sequential model's text part, the fusion and recency signals).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

FEATURES = (
    "sequential",
    "fusion",
    "covisit",
    "covisit_last",
    "popularity",
    "recency",
)
#: Which reason an explanation leads with when a signal contributed most to an item's score.
SIGNAL_REASON = {
    "sequential": "history",
    "recency": "history",
    "fusion": "history",
    "covisit": "covisit",
    "covisit_last": "covisit",
    "popularity": "popular",
}


@dataclass(slots=True)
class Signals:
    """One user's candidates and their signal matrix (rows follow ``items``)."""

    items: list[str]
    values: np.ndarray  # (len(items), len(FEATURES)) float32


def signals(
    items: Sequence[str],
    *,
    sequential: np.ndarray,
    fusion: np.ndarray,
    covisit: Mapping[str, float],
    last_neighbours: Mapping[str, float] | None,
    popular: Mapping[str, float],
    recency: np.ndarray,
) -> Signals:
    """Assemble the signal matrix of one user's candidates from already computed parts."""
    total = sum(last_neighbours.values()) if last_neighbours else 0.0
    peak = max(popular.values(), default=0.0)
    pop_scale = np.log1p(peak) if peak > 0 else 1.0
    values = np.zeros((len(items), len(FEATURES)), dtype=np.float32)
    values[:, 0] = sequential
    values[:, 1] = fusion
    values[:, 5] = recency
    for row, item in enumerate(items):
        values[row, 2] = covisit.get(item, 0.0)
        if total > 0 and last_neighbours:
            values[row, 3] = last_neighbours.get(item, 0.0) / total
        values[row, 4] = np.log1p(popular.get(item, 0.0)) / pop_scale
    return Signals(list(items), values)


@dataclass(frozen=True)
class Reranker:
    """score = sum_k weight_k * (signal_k - mean_k) / scale_k."""

    weights: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    features: tuple[str, ...] = FEATURES

    @classmethod
    def default(cls) -> Reranker:
        """Before fitting: the sequential model's score alone."""
        w = np.zeros(len(FEATURES), dtype=np.float32)
        w[0] = 1.0
        return cls(w, np.zeros_like(w), np.ones_like(w))

    def contributions(self, values: np.ndarray) -> np.ndarray:
        return ((values - self.mean) / self.scale) * self.weights

    def score(self, values: np.ndarray) -> np.ndarray:
        return self.contributions(values).sum(axis=1)

    def lead_signal(self, values: np.ndarray) -> list[str]:
        """Per row: the signal whose contribution lifted the item most."""
        if not len(values):
            return []
        best = np.argmax(self.contributions(values), axis=1)
        return [self.features[i] for i in best]

    def to_dict(self) -> dict[str, object]:
        return {
            "features": list(self.features),
            "weights": [float(w) for w in self.weights],
            "mean": [float(m) for m in self.mean],
            "scale": [float(s) for s in self.scale],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Reranker:
        features = tuple(str(f) for f in data["features"])  # type: ignore[attr-defined]
        if features != FEATURES:
            raise ValueError(f"re-ranker signals {features} differ from this version's {FEATURES}")
        return cls(
            np.asarray(data["weights"], dtype=np.float32),
            np.asarray(data["mean"], dtype=np.float32),
            np.asarray(data["scale"], dtype=np.float32),
            features,
        )


def fit_reranker(
    lists: Sequence[Signals], targets: Sequence[str], *, epochs: int = 300, l2: float = 1e-3
) -> Reranker:
    """Fit the weights by a listwise softmax on the lists whose target is among the candidates."""
    import torch

    rows = [(s, s.items.index(t)) for s, t in zip(lists, targets, strict=True) if t in s.items]
    if not rows:
        return Reranker.default()
    stacked = np.concatenate([s.values for s, _ in rows])
    mean = stacked.mean(axis=0)
    scale = stacked.std(axis=0)
    scale[scale < 1e-6] = 1.0
    width = max(len(s.items) for s, _ in rows)
    values = np.zeros((len(rows), width, len(FEATURES)), dtype=np.float32)
    valid = np.zeros((len(rows), width), dtype=bool)
    for n, (s, _) in enumerate(rows):
        values[n, : len(s.items)] = (s.values - mean) / scale
        valid[n, : len(s.items)] = True
    x = torch.from_numpy(values)
    mask = torch.from_numpy(valid)
    target = torch.tensor([t for _, t in rows])
    w = torch.zeros(len(FEATURES), requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=0.5, max_iter=epochs, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = (x @ w).masked_fill(~mask, -1e9)
        loss = torch.nn.functional.cross_entropy(logits, target) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return Reranker(w.detach().numpy().astype(np.float32), mean, scale)
