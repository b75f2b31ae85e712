"""The sequential model: a causal transformer over the user's recent items (SASRec-style), whose
item representations are the encoder's text vector, projected, plus a learned item-id embedding
(UniSRec-style). Items the model never saw get the text part only, so new items rank by their text.

Scores are cosines between the user's last hidden state and item representations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class SeqConfig:
    """Shape and regularisation of the sequential model (one recipe for every dataset)."""

    text_dim: int = 384
    dim: int = 64
    layers: int = 2
    heads: int = 2
    max_len: int = 50
    dropout: float = 0.2
    id_dropout: float = 0.1  # share of item ids hidden per step, so the text path learns alone
    temperature: float = 0.07

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


class SeqModel(nn.Module):
    """Causal transformer over item representations; ``items`` is the id vocabulary size."""

    def __init__(self, cfg: SeqConfig, items: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.items = items
        self.register_buffer("text_mean", torch.zeros(cfg.text_dim))
        self.register_buffer("text_std", torch.ones(cfg.text_dim))
        self.proj = nn.Linear(cfg.text_dim, cfg.dim, bias=False)
        self.ids = nn.Embedding(items + 1, cfg.dim, padding_idx=items)  # last row: no id
        nn.init.zeros_(self.ids.weight)
        self.pos = nn.Embedding(cfg.max_len, cfg.dim)
        nn.init.normal_(self.pos.weight, std=0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.dim, cfg.heads, cfg.dim * 2, cfg.dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)

    def set_text_stats(self, text: torch.Tensor) -> None:
        """Standardise text vectors with the catalogue's per-dimension mean and spread."""
        self.get_buffer("text_mean").copy_(text.mean(0))
        self.get_buffer("text_std").copy_(text.std(0).clamp_min(1e-6))

    def represent(
        self, text: torch.Tensor, ids: torch.Tensor, id_dropout: float = 0.0
    ) -> torch.Tensor:
        """Item representations from text vectors (n, text_dim) and vocabulary ids (n,; or
        ``self.items`` for an item without a learned id)."""
        mean, std = self.get_buffer("text_mean"), self.get_buffer("text_std")
        rep = self.proj((text - mean) / std)
        emb = self.ids(ids)
        if id_dropout > 0.0 and self.training:
            emb = emb * (torch.rand(emb.shape[0], 1, device=emb.device) >= id_dropout)
        return rep + emb

    def hidden(self, seq_reps: torch.Tensor) -> torch.Tensor:
        """Hidden states (b, L, dim) for left-aligned, padded sequences of item representations.

        Padding sits after the last real item and the mask is causal, so no real position ever
        attends to padding.
        """
        length = seq_reps.shape[1]
        x = self.drop(self.norm(seq_reps + self.pos.weight[:length][None]))
        mask = torch.triu(
            torch.ones(length, length, dtype=torch.bool, device=seq_reps.device), diagonal=1
        )
        return self.encoder(x, mask=mask) + seq_reps

    def scores(self, hidden: torch.Tensor, reps: torch.Tensor) -> torch.Tensor:
        """Cosine of each hidden state with each item representation."""
        return F.normalize(hidden, dim=-1) @ F.normalize(reps, dim=-1).T


def pad_right(
    seqs: Sequence[Sequence[int]], length: int, pad: int
) -> tuple[np.ndarray, np.ndarray]:
    """The last ``length`` entries of each sequence, left-aligned and padded; and each one's last
    index (-1 for an empty sequence)."""
    out = np.full((len(seqs), length), pad, dtype=np.int64)
    last = np.zeros(len(seqs), dtype=np.int64)
    for row, seq in enumerate(seqs):
        tail = list(seq)[-length:]
        out[row, : len(tail)] = tail
        last[row] = len(tail) - 1
    return out, last
