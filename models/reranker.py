"""The learned re-ranker: a score over a few signals per candidate, fitted on validation events
with a listwise softmax (the held-out item against every other candidate of its list).

The score is a linear term over the standardised signals, optionally plus a small two-layer
network over the same inputs, which lets one signal change how much another counts (the
sequential score of an item whose learned id saw few interactions is worth less than that of a
well-known one). The linear term is fitted first (L-BFGS); the network, whose output starts at
zero, then learns with it what the linear term leaves (AdamW, fixed epochs and seed). Training
fits both ways on all but one of five folds of the validation lists, in turn, and keeps the
network only when it ranks the held-out folds' targets better (NDCG@10) by more than one
standard error of the per-list difference (:func:`choose_reranker`): on a small validation set
the network can fit noise, and then the linear re-ranker is kept.

The signals, each computed the same way in training, offline evaluation and the stream:

- ``sequential``: the sequential model's cosine between the user and the item;
- ``fusion``: the cosine between the fusion query f(x, z) and the item's text vector;
- ``covisit``: co-visitation with the user's last few items (normalised per list);
- ``covisit_last``: the share of the latest item's co-visitation count that goes to this item;
- ``popularity``: decayed popularity, log-scaled, relative to the most popular item;
- ``recency``: text similarity to the user's latest item (what they are looking at now);
- ``text_sequential``: the sequential model's cosine with the item's text part alone (as if it
  had no learned id);
- ``trained_count``: log(1 + the item's interactions in the model's training part), which says
  how much the item's learned id has seen; it is a property of the model, fixed at training.

There is deliberately no "new in the stream" signal: validation lists would teach it that items
nobody has touched yet are rarely the next one, and new items would be pushed down for being new.
``trained_count`` is not that: it counts the training part only, and validation targets include
items the training part saw rarely or never, so what it learns is how far an item's learned id,
or its text alone, can be trusted. On validation it lifted the cold-item slice, not lowered it
(docs/training.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from schemas.scoring import hit, ndcg

if TYPE_CHECKING:
    import torch

FEATURES = (
    "sequential",
    "fusion",
    "covisit",
    "covisit_last",
    "popularity",
    "recency",
    "text_sequential",
    "trained_count",
)
#: Which reason an explanation leads with when a signal contributed most to an item's score.
SIGNAL_REASON = {
    "sequential": "history",
    "recency": "history",
    "fusion": "history",
    "text_sequential": "history",
    "covisit": "covisit",
    "covisit_last": "covisit",
    "popularity": "popular",
    "trained_count": "popular",
}
HIDDEN = 32  # width of the network's two layers
EPOCHS = 40  # passes of the network over the validation lists
FOLDS = 5  # cross-validation folds that choose between the linear and the network re-ranker
K = 10


@dataclass(slots=True)
class Signals:
    """One user's candidates and their signal matrix (rows follow ``items``)."""

    items: list[str]
    values: np.ndarray  # (len(items), len(FEATURES)) float32


def signals(
    items: Sequence[str],
    *,
    sequential: np.ndarray,
    text_sequential: np.ndarray,
    fusion: np.ndarray,
    covisit: Mapping[str, float],
    last_neighbours: Mapping[str, float] | None,
    popular: Mapping[str, float],
    recency: np.ndarray,
    trained_count: np.ndarray,
) -> Signals:
    """Assemble the signal matrix of one user's candidates from already computed parts
    (``trained_count`` is the raw count; it is log-scaled here)."""
    total = sum(last_neighbours.values()) if last_neighbours else 0.0
    peak = max(popular.values(), default=0.0)
    pop_scale = np.log1p(peak) if peak > 0 else 1.0
    values = np.zeros((len(items), len(FEATURES)), dtype=np.float32)
    values[:, 0] = sequential
    values[:, 1] = fusion
    values[:, 5] = recency
    values[:, 6] = text_sequential
    values[:, 7] = np.log1p(trained_count)
    for row, item in enumerate(items):
        values[row, 2] = covisit.get(item, 0.0)
        if total > 0 and last_neighbours:
            values[row, 3] = last_neighbours.get(item, 0.0) / total
        values[row, 4] = np.log1p(popular.get(item, 0.0)) / pop_scale
    return Signals(list(items), values)


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


@dataclass(frozen=True)
class Reranker:
    """score = w . z + net(z) with z = (signal - mean) / scale and
    net(z) = relu(relu(z A + a) B + b) . c (absent when ``net`` is empty)."""

    weights: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    features: tuple[str, ...] = FEATURES
    net: tuple[np.ndarray, ...] = field(default=())  # (A, a, B, b, c), or () for linear only

    @classmethod
    def default(cls) -> Reranker:
        """Before fitting: the sequential model's score alone."""
        w = np.zeros(len(FEATURES), dtype=np.float32)
        w[0] = 1.0
        return cls(w, np.zeros_like(w), np.ones_like(w))

    def _standard(self, values: np.ndarray) -> np.ndarray:
        return ((values - self.mean) / self.scale).astype(np.float32)

    def _score(self, z: np.ndarray) -> np.ndarray:
        out = z @ self.weights
        if self.net:
            a_w, a_b, b_w, b_b, c_w = self.net
            out = out + _relu(_relu(z @ a_w + a_b) @ b_w + b_b) @ c_w
        return out

    def score(self, values: np.ndarray) -> np.ndarray:
        return self._score(self._standard(values))

    def contributions(self, values: np.ndarray) -> np.ndarray:
        """Per row and signal: how much the score falls when that signal alone is set to its
        validation mean. For the linear term alone this is weight x standardised value."""
        z = self._standard(values)
        n, f = z.shape
        if not self.net:
            return z * self.weights
        without = np.repeat(z[None], f, axis=0)  # (f, n, f): copy k has signal k at its mean
        without[np.arange(f), :, np.arange(f)] = 0.0
        base = self._score(z)
        return base[:, None] - self._score(without.reshape(f * n, f)).reshape(f, n).T

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
            "net": [np.asarray(p).tolist() for p in self.net],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Reranker:
        features = tuple(str(f) for f in data["features"])  # type: ignore[attr-defined]
        if features != FEATURES:
            raise ValueError(f"re-ranker signals {features} differ from this version's {FEATURES}")
        net = tuple(np.asarray(p, dtype=np.float32) for p in data.get("net", []))  # type: ignore[attr-defined]
        if net and (len(net) != 5 or net[0].shape[0] != len(FEATURES)):
            raise ValueError("re-ranker network has the wrong shape")
        return cls(
            np.asarray(data["weights"], dtype=np.float32),
            np.asarray(data["mean"], dtype=np.float32),
            np.asarray(data["scale"], dtype=np.float32),
            features,
            net,
        )


def fit_reranker(
    lists: Sequence[Signals],
    targets: Sequence[str],
    *,
    hidden: int = HIDDEN,
    epochs: int = EPOCHS,
    seed: int = 0,
    l2: float = 1e-3,
) -> Reranker:
    """Fit by a listwise softmax on the lists whose target is among the candidates: the linear
    term first, then (``hidden`` > 0) the network on top of it, jointly with the linear term."""
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
    opt = torch.optim.LBFGS([w], lr=0.5, max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = (x @ w).masked_fill(~mask, -1e9)
        loss = torch.nn.functional.cross_entropy(logits, target) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    if hidden <= 0:
        return Reranker(w.detach().numpy().astype(np.float32), mean, scale)
    net = _fit_net(x, mask, target, w.detach().clone(), hidden, epochs, seed)
    return Reranker(net[0], mean, scale, FEATURES, net[1:])


def _fit_net(  # noqa: PLR0917 - the packed lists and the network's settings
    x: torch.Tensor,
    mask: torch.Tensor,
    target: torch.Tensor,
    w0: torch.Tensor,
    hidden: int,
    epochs: int,
    seed: int,
) -> tuple[np.ndarray, ...]:
    """AdamW on the linear term (from its L-BFGS fit) plus a two-layer network whose last layer
    starts at zero, so training starts from the linear fit. Returns (w, A, a, B, b, c)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    f = int(w0.shape[0])

    def init(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) / np.sqrt(shape[0])).requires_grad_()

    params = [
        w0.requires_grad_(),
        init(f, hidden),
        torch.zeros(hidden, requires_grad=True),
        init(hidden, hidden),
        torch.zeros(hidden, requires_grad=True),
        torch.zeros(hidden, requires_grad=True),
    ]
    w, a_w, a_b, b_w, b_b, c_w = params
    relu = torch.relu
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=1e-4)
    n = len(target)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, 256):
            b = order[start : start + 256]
            real = mask[b]
            z = x[b][real]  # the batch's candidates, without the padding of shorter lists
            hid = relu(relu(z @ a_w + a_b) @ b_w + b_b)
            logits = torch.full(real.shape, -1e9).masked_scatter(real, z @ w + hid @ c_w)
            loss = torch.nn.functional.cross_entropy(logits, target[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return tuple(p.detach().numpy().astype(np.float32) for p in params)


def cross_validate(
    lists: Sequence[Signals],
    targets: Sequence[str],
    *,
    folds: int = FOLDS,
    k: int = K,
    **fit: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Each list's hit@k and NDCG@k (a target outside the candidates is a miss), each fold's
    lists (every ``folds``-th, in order) ranked by a re-ranker fitted on the other folds."""
    hits, gains = np.zeros(len(lists)), np.zeros(len(lists))
    for fold in range(folds):
        held = range(fold, len(lists), folds)
        rest = [n for n in range(len(lists)) if n % folds != fold]
        fitted = fit_reranker([lists[n] for n in rest], [targets[n] for n in rest], **fit)
        for n in held:
            sig = lists[n]
            order = np.argsort(-fitted.score(sig.values), kind="stable")[:k]
            shown = [sig.items[j] for j in order]
            hits[n] = hit(shown, targets[n], k)
            gains[n] = ndcg(shown, targets[n], k)
    return hits, gains


def paired_gain(better: np.ndarray, base: np.ndarray) -> tuple[float, float]:
    """The mean per-list gain of ``better`` over ``base`` on the same lists, and its standard
    error (0 for fewer than two lists)."""
    diff = np.asarray(better, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    if len(diff) < 2:
        return float(diff.mean()) if len(diff) else 0.0, 0.0
    return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff)))


def choose_reranker(
    lists: Sequence[Signals], targets: Sequence[str], *, folds: int = FOLDS
) -> tuple[Reranker, dict[str, object]]:
    """The linear re-ranker, or the linear term plus network when it ranks the validation
    targets better across ``folds`` folds by more than chance would: its NDCG@10 gain over the
    linear one, list by list, must exceed one standard error of that paired gain (the simpler
    model unless the richer one is better by more than its noise; NDCG@10 counts a hit's place
    in the list too, so a network that lifts targets within the top 10 counts). Fitted again on
    every list; the comparison goes to the manifest."""
    lin_hits, lin_gains = cross_validate(lists, targets, folds=folds, hidden=0)
    net_hits, net_gains = cross_validate(lists, targets, folds=folds)
    gain, error = paired_gain(net_gains, lin_gains)
    chosen = "network" if gain > error else "linear"
    fitted = fit_reranker(lists, targets, hidden=HIDDEN if chosen == "network" else 0)
    return fitted, {
        "folds": folds,
        "linear": _means(lin_hits, lin_gains),
        "network": _means(net_hits, net_gains),
        f"network_NDCG@{K}_gain": round(gain, 4),
        "gain_standard_error": round(error, 4),
        "chosen": chosen,
    }


def _means(hits: np.ndarray, gains: np.ndarray) -> dict[str, float]:
    total = max(len(hits), 1)
    return {
        f"HR@{K}": round(float(hits.sum()) / total, 4),
        f"NDCG@{K}": round(float(gains.sum()) / total, 4),
    }
