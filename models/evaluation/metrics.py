"""Aggregate offline-evaluation metrics over one model's recommendation lists, whole and by slice.

Accuracy per target comes from ``schemas.scoring`` (the rules the online evaluator shares); this
module averages it and adds the beyond-accuracy metrics: catalogue coverage, intra-list diversity
and novelty. Everything is a pure function over plain data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np

from schemas.scoring import hit, mrr, ndcg

#: Slices reported beside "all", each a mask over a run's targets.
SLICES = ("cold_users", "cold_items", "warm_users", "warm_items")


@dataclass
class ModelRun:
    """One model's recommendation lists for every target of an evaluation."""

    name: str  # e.g. "mostpop"
    lists: list[list[str]]  # per target: recommended item ids, best first
    targets: list[str]  # per target: the held-out item
    cold_user: np.ndarray  # bool per target: the user had < 5 earlier interactions
    cold_item: np.ndarray  # bool per target: the target item had < 5 earlier interactions
    seconds: float = 0.0  # time the model took (fit + recommend)

    def __post_init__(self) -> None:
        self.cold_user = np.asarray(self.cold_user, dtype=bool)
        self.cold_item = np.asarray(self.cold_item, dtype=bool)
        sizes = {len(self.lists), len(self.targets), len(self.cold_user), len(self.cold_item)}
        if len(sizes) != 1:
            raise ValueError(
                f"run {self.name!r}: lists, targets, cold_user and cold_item differ in length "
                f"({len(self.lists)}, {len(self.targets)}, {len(self.cold_user)}, "
                f"{len(self.cold_item)})"
            )


def summarize(
    run: ModelRun,
    ks: Sequence[int],
    *,
    catalogue: Sequence[str],
    item_vectors: Mapping[str, np.ndarray] | None,
    popularity: Mapping[str, int],
) -> dict[str, float]:
    """Every metric at every K for one run, plus ``targets`` (the number of targets).

    ``diversity@K`` is left out when there are no item vectors, or when no top-K list has two
    items with vectors (always so at K=1); ``novelty@K`` is left out when no list has an item.
    A run without targets gives only ``{"targets": 0}``.
    """
    scored = _Scored(run, ks, catalogue, item_vectors, popularity)
    return scored.summary(np.ones(len(run.targets), dtype=bool))


def summarize_slices(
    run: ModelRun,
    ks: Sequence[int],
    *,
    catalogue: Sequence[str],
    item_vectors: Mapping[str, np.ndarray] | None,
    popularity: Mapping[str, int],
) -> dict[str, dict[str, float]]:
    """``summarize`` over all targets and over each cold/warm user/item slice.

    Each target is scored once; the slices only aggregate different subsets of those scores.
    """
    scored = _Scored(run, ks, catalogue, item_vectors, popularity)
    masks = {
        "all": np.ones(len(run.targets), dtype=bool),
        "cold_users": run.cold_user,
        "cold_items": run.cold_item,
        "warm_users": ~run.cold_user,
        "warm_items": ~run.cold_item,
    }
    return {name: scored.summary(mask) for name, mask in masks.items()}


class _Scored:
    """Per-target scores of one run at every K, ready to be averaged over any subset of targets.

    Items of the top-max(K) lists are coded as integers: ``codes`` is (targets, max K) with -1
    where a list is shorter.
    """

    def __init__(
        self,
        run: ModelRun,
        ks: Sequence[int],
        catalogue: Sequence[str],
        item_vectors: Mapping[str, np.ndarray] | None,
        popularity: Mapping[str, int],
    ) -> None:
        if not ks or any(k < 1 for k in ks):
            raise ValueError(f"ks must be positive cut-offs, got {list(ks)}")
        if not catalogue:
            raise ValueError("the catalogue is empty: coverage and novelty are undefined")
        self.ks = list(ks)
        self.catalogue_size = len(catalogue)
        self.accuracy = {k: _accuracy(run, k) for k in self.ks}
        items, self.codes = _encode(run.lists, max(self.ks))
        self.self_info = _self_information(items, catalogue, popularity)
        self.diversity = (
            None
            if item_vectors is None
            else _diversity(self.codes, self.ks, _unit_rows(items, item_vectors))
        )

    def summary(self, mask: np.ndarray) -> dict[str, float]:
        """The metrics averaged over the targets where ``mask`` is true."""
        out: dict[str, float] = {"targets": int(mask.sum())}
        if not out["targets"]:
            return out
        codes = self.codes[mask]
        for k in self.ks:
            for name, values in self.accuracy[k].items():
                out[f"{name}@{k}"] = float(values[mask].mean())
            top = codes[:, :k]
            top = top[top >= 0]
            out[f"coverage@{k}"] = len(np.unique(top)) / self.catalogue_size
            if self.diversity is not None:
                per_list = self.diversity[k][mask]
                per_list = per_list[~np.isnan(per_list)]
                if per_list.size:
                    out[f"diversity@{k}"] = float(per_list.mean())
            if top.size:
                out[f"novelty@{k}"] = float(self.self_info[top].mean())
        return out


def _accuracy(run: ModelRun, k: int) -> dict[str, np.ndarray]:
    """HR, NDCG and MRR at K per target, by the shared scoring rules."""
    pairs = list(zip(run.lists, run.targets, strict=True))
    return {
        "HR": np.array([hit(ranked, target, k) for ranked, target in pairs], dtype=np.float64),
        "NDCG": np.array([ndcg(ranked, target, k) for ranked, target in pairs], dtype=np.float64),
        "MRR": np.array([mrr(ranked, target, k) for ranked, target in pairs], dtype=np.float64),
    }


def _encode(lists: Sequence[Sequence[str]], max_k: int) -> tuple[list[str], np.ndarray]:
    """The distinct items of the top-``max_k`` lists, and each list as their codes (-1 padded)."""
    tops = [ranked[:max_k] for ranked in lists]
    flat = list(chain.from_iterable(tops))
    items = list(dict.fromkeys(flat))
    index = {item: code for code, item in enumerate(items)}
    lengths = np.array([len(top) for top in tops], dtype=np.int64)
    codes = np.full((len(lists), max_k), -1, dtype=np.int64)
    codes[np.arange(max_k) < lengths[:, None]] = np.fromiter(
        map(index.__getitem__, flat), dtype=np.int64, count=len(flat)
    )
    return items, codes


def _self_information(
    items: Sequence[str], catalogue: Sequence[str], popularity: Mapping[str, int]
) -> np.ndarray:
    """-log2 p(i) per item, p(i) = (pop(i) + 1) / (sum(pop) + |catalogue|) (add-one smoothing)."""
    total = sum(popularity.values()) + len(catalogue)
    counts = np.array([popularity.get(item, 0) for item in items], dtype=np.float64)
    return -np.log2((counts + 1.0) / total)


def _unit_rows(items: Sequence[str], item_vectors: Mapping[str, np.ndarray]) -> np.ndarray:
    """Each item's vector at unit length; a zero row where it has none (or a zero vector)."""
    present = [i for i, item in enumerate(items) if item in item_vectors]
    if not present:
        return np.zeros((len(items), 1))
    stacked = np.stack([item_vectors[items[i]] for i in present]).astype(np.float64)
    norms = np.linalg.norm(stacked, axis=1, keepdims=True)
    unit = np.zeros((len(items), stacked.shape[1]))
    unit[present] = np.divide(stacked, norms, out=np.zeros_like(stacked), where=norms > 0)
    return unit


def _diversity(codes: np.ndarray, ks: Sequence[int], unit: np.ndarray) -> dict[int, np.ndarray]:
    """Per list and K, the mean pairwise (1 - cosine) of its top-K items' unit vectors.

    NaN where fewer than two of the top K have a vector. For n unit vectors with sum s, the
    cosines over pairs i<j add up to (|s|^2 - n) / 2, so a list costs one sum, not an n x n
    Gram matrix; lists are processed in chunks to bound memory.
    """
    padded = np.vstack([unit, np.zeros((1, unit.shape[1]))])  # code -1 -> the zero row
    sq_norms = np.einsum("ij,ij->i", padded, padded)
    has_vector = sq_norms > 0.0
    out = {k: np.full(len(codes), np.nan) for k in ks}
    chunk = max(1, _CHUNK_FLOATS // (codes.shape[1] * padded.shape[1]))
    for start in range(0, len(codes), chunk):
        block = codes[start : start + chunk]
        vecs = padded[block]  # (lists, max K, dim)
        for k in ks:
            total = vecs[:, :k].sum(axis=1)
            n = has_vector[block[:, :k]].sum(axis=1)
            pair_cos = (np.einsum("ij,ij->i", total, total) - sq_norms[block[:, :k]].sum(1)) / 2
            with np.errstate(divide="ignore", invalid="ignore"):
                div = 1.0 - pair_cos / (n * (n - 1) / 2)
            out[k][start : start + chunk] = np.where(n >= 2, div, np.nan)
    return out


#: Floats gathered at once when computing diversity (about 32 MB of float64).
_CHUNK_FLOATS = 4_000_000
