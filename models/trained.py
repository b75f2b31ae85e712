"""A trained model directory and the model it holds.

Layout of ``MODEL_DIR``::

    manifest.json     version, training-data fingerprint, settings, validation metrics
                      (written last)
    fusion.npz        the fusion's W1 and W2
    sequential.pt     the sequential models' weights (one per ensemble member) and config
    items.json        the sequential model's item-id vocabulary
    item_reps.npy     the vocabulary's item representations at training time (candidate retrieval)
    item_counts.npy   each vocabulary item's interactions in the training part
    reranker.json     the re-ranker's signal weights and network

A directory is written to a sibling temporary directory and swapped in by rename, manifest last, so
a worker watching the path never loads half a model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from models.reranker import Reranker
from models.state import Fusion

MANIFEST = "manifest.json"
FORMAT = 1


class ModelDirError(ValueError):
    """A model directory that is missing, incomplete or from an incompatible version."""


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the model directory ``path``."""
    file = path / MANIFEST
    if not file.is_file():
        raise ModelDirError(f"{path} is not a model directory (no {MANIFEST})")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelDirError(f"{file} is not readable JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelDirError(f"{file} has an unsupported format (expected {FORMAT})")
    return manifest


def manifest_version(path: Path) -> str | None:
    """The version in ``path``'s manifest, or None when there is no readable one (yet)."""
    try:
        return str(read_manifest(path)["version"])
    except (ModelDirError, KeyError):
        return None


@dataclass
class TrainedModel:
    """Everything a recommender needs from training, loaded for CPU or GPU inference."""

    version: str
    manifest: dict[str, Any]
    fusion: Fusion
    seqs: list[Any]  # models.sequential.SeqModel, one per seed (torch is imported on load only)
    vocab: list[str]
    item_reps: np.ndarray  # (len(vocab), members * dim): each member's unit representation
    counts: np.ndarray  # (len(vocab),): each item's interactions in the training part
    reranker: Reranker
    index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = {item: n for n, item in enumerate(self.vocab)}

    # The ensemble lives in one space: a user vector is the members' unit hidden states side by
    # side, divided by the number of members, and an item vector is the members' unit
    # representations side by side; their dot product is the members' mean cosine.

    @classmethod
    def load(cls, path: Path, device: str = "cpu") -> TrainedModel:
        import torch

        from models.sequential import SeqConfig, SeqModel

        manifest = read_manifest(path)
        try:
            vocab = json.loads((path / "items.json").read_text())
            saved = torch.load(path / "sequential.pt", map_location=device, weights_only=True)
            seqs = []
            for state in saved["states"]:
                seq = SeqModel(SeqConfig(**saved["config"]), len(vocab)).to(device)
                seq.load_state_dict(state)
                seq.eval()
                seqs.append(seq)
            reranker = Reranker.from_dict(json.loads((path / "reranker.json").read_text()))
            fusion = Fusion.load(path / "fusion.npz")
            reps = np.load(path / "item_reps.npy").astype(np.float32)
            counts = np.load(path / "item_counts.npy").astype(np.float32)
        except (OSError, KeyError, ValueError, RuntimeError) as exc:
            raise ModelDirError(f"{path} is incomplete or damaged: {exc}") from None
        version = str(manifest["version"])
        if len(counts) != len(vocab):
            raise ModelDirError(f"{path}: item_counts.npy does not match items.json")
        fusion = Fusion(fusion.w1, fusion.w2, version)
        return cls(version, manifest, fusion, seqs, vocab, reps, counts, reranker)

    # --- inference -------------------------------------------------------------------------

    def _device(self) -> Any:
        return next(self.seqs[0].parameters()).device

    def _inputs(self, items: Sequence[str], vectors: Mapping[str, np.ndarray]) -> tuple[Any, Any]:
        import torch

        dev = self._device()
        text = torch.as_tensor(
            np.stack([vectors[i] for i in items]), dtype=torch.float32, device=dev
        )
        ids = torch.tensor([self.index.get(i, len(self.vocab)) for i in items], device=dev)
        return text, ids

    def user_vectors(
        self, histories: Sequence[Sequence[str]], vectors: Mapping[str, np.ndarray]
    ) -> np.ndarray:
        """The sequential model's state for each history (item ids, oldest first); items without a
        text vector are skipped; an empty history gives a zero row."""
        import torch

        cfg = self.seqs[0].cfg
        out = np.zeros((len(histories), cfg.dim * len(self.seqs)), dtype=np.float32)
        kept = [[i for i in h if i in vectors][-cfg.max_len :] for h in histories]
        rows = [n for n, h in enumerate(kept) if h]
        if not rows:
            return out
        unique = list(dict.fromkeys(i for n in rows for i in kept[n]))
        where = {item: n for n, item in enumerate(unique)}
        positions = [[where[i] for i in kept[n]] for n in rows]
        last = torch.tensor([len(p) - 1 for p in positions])
        length = max(len(p) for p in positions)
        parts = []
        with torch.inference_mode():
            text, ids = self._inputs(unique, vectors)
            for seq in self.seqs:
                reps = seq.represent(text, ids)
                seq_reps = torch.zeros((len(rows), length, cfg.dim), device=reps.device)
                for r, pos in enumerate(positions):
                    seq_reps[r, : len(pos)] = reps[pos]
                hidden = seq.last_hidden(seq_reps, last + 1)
                parts.append(torch.nn.functional.normalize(hidden, dim=-1))
            joined = torch.cat(parts, dim=1) / len(self.seqs)
        out[rows] = joined.float().cpu().numpy()
        return out

    def item_scores(
        self, user: np.ndarray, items: Sequence[str], vectors: Mapping[str, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Cosines of one user's state with each item's representation (from its current text),
        and with the item's text part alone (as if it had no learned id).

        Computed in NumPy from :attr:`_maps`: one matrix product for the members' text parts, then
        element-wise work on a few hundred rows, which torch would hand to its thread pool op by
        op (on two cores the pool's hand-offs took longer than the arithmetic).
        """
        n = len(items)
        if not items or not np.any(user):
            return np.zeros(n, dtype=np.float32), np.zeros(n, dtype=np.float32)
        project, offset, ids = self._maps
        members = len(self.seqs)
        per_member = user.reshape(members, -1)
        text = np.stack([vectors[i] for i in items]).astype(np.float32, copy=False)
        part = text @ project + offset  # (n, members * dim): the text parts
        rows = self._rows(items)
        full = part.copy()
        known = rows >= 0
        full[known] += ids[rows[known]]
        return _member_cosines(full, per_member), _member_cosines(part, per_member)

    @cached_property
    def _maps(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The members' text parts as one affine map of a text vector, ``text @ project +
        offset``, and their learned id rows, side by side (computed once, on the CPU)."""
        project, offset, ids = [], [], []
        for seq in self.seqs:
            weight, shift = seq.text_map()
            project.append(weight.detach().float().cpu().numpy())
            offset.append(shift.detach().float().cpu().numpy())
            ids.append(seq.ids.weight.detach().float().cpu().numpy()[: len(self.vocab)])
        return np.concatenate(project, axis=1), np.concatenate(offset), np.concatenate(ids, axis=1)

    def _rows(self, items: Sequence[str]) -> np.ndarray:
        """Each item's vocabulary row, or -1 for an item the model never saw."""
        return np.fromiter((self.index.get(i, -1) for i in items), dtype=np.intp, count=len(items))

    def trained_counts(self, items: Sequence[str]) -> np.ndarray:
        """Each item's interactions in the training part (0 for an item it never saw)."""
        rows = self._rows(items)
        return np.where(rows >= 0, self.counts[rows], 0.0).astype(np.float32)

    def top_known(self, users: np.ndarray, n: int) -> list[list[str]]:
        """The ``n`` vocabulary items closest to each user state (candidate retrieval)."""
        scores = users @ self.item_reps.T
        n = min(n, len(self.vocab))
        top = np.argpartition(-scores, n - 1, axis=1)[:, :n]
        return [
            [self.vocab[i] for i in row] if np.any(u) else []
            for row, u in zip(top, users, strict=True)
        ]

    def text_queries(self, users: np.ndarray) -> np.ndarray:
        """Queries in the encoder's space whose dot product with a text vector ranks items as the
        text part of their representations does: the members' (P^T h) / std, summed."""
        project, _, _ = self._maps
        return (users @ project.T).astype(np.float32, copy=False)


def _member_cosines(reps: np.ndarray, user: np.ndarray) -> np.ndarray:
    """For item rows ``reps`` (n, members * dim) and a user's per-member parts ``user``
    (members, dim): the sum over members of the user part's dot product with the item's unit
    member part (a zero part counts as zero, as ``F.normalize`` leaves it)."""
    parts = reps.reshape(len(reps), *user.shape)
    dots = np.einsum("nmd,md->nm", parts, user)
    norms = np.sqrt(np.einsum("nmd,nmd->nm", parts, parts))
    return (dots / np.maximum(norms, 1e-12)).sum(axis=1, dtype=np.float32)


def fingerprint(path: Path) -> str:
    """sha256 over the log's Parquet files (names and bytes, in name order)."""
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with file.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def write_model_dir(
    out: Path,
    *,
    manifest: dict[str, Any],
    fusion: Fusion,
    seq_states: Sequence[dict[str, Any]],
    seq_config: dict[str, Any],
    vocab: Sequence[str],
    item_reps: np.ndarray,
    counts: np.ndarray,
    reranker: Reranker,
) -> Path:
    """Write a model directory atomically: build it beside ``out``, then swap it in."""
    import torch

    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        fusion.save(tmp / "fusion.npz")
        torch.save({"config": seq_config, "states": list(seq_states)}, tmp / "sequential.pt")
        (tmp / "items.json").write_text(json.dumps(list(vocab)))
        np.save(tmp / "item_reps.npy", item_reps.astype(np.float32))
        np.save(tmp / "item_counts.npy", np.asarray(counts, dtype=np.float32))
        (tmp / "reranker.json").write_text(json.dumps(reranker.to_dict(), indent=2))
        (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, **manifest}, indent=2) + "\n")
        if out.exists():
            old = out.parent / f".{out.name}-old-{int(time.time() * 1000)}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
