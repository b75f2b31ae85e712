"""The sequential model: a causal transformer over the user's recent items (SASRec-style), whose
item representations are the encoder's text vector, projected, plus a learned item-id embedding
(UniSRec-style). Items the model never saw get the text part only, so new items rank by their text.

Scores are cosines between the user's last hidden state and item representations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class SeqConfig:
    """Shape and regularisation of the sequential model (one recipe for every dataset)."""

    text_dim: int = 384
    dim: int = 256
    layers: int = 2
    heads: int = 2
    max_len: int = 50
    dropout: float = 0.5
    id_dropout: float = 0.1  # share of item ids hidden per step, so the text path learns alone
    temperature: float = 0.1

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

    def set_text_stats(self, text: torch.Tensor) -> None:
        """Standardise text vectors with the catalogue's per-dimension mean and spread."""
        self.get_buffer("text_mean").copy_(text.mean(0))
        self.get_buffer("text_std").copy_(text.std(0).clamp_min(1e-6))

    def text_part(self, text: torch.Tensor) -> torch.Tensor:
        """The text half of item representations: standardised text vectors, projected."""
        mean, std = self.get_buffer("text_mean"), self.get_buffer("text_std")
        return self.proj((text - mean) / std)

    def text_map(self) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`text_part` as one affine map, ``text @ weight + shift``: weight (text_dim, dim)
        and shift (dim,)."""
        mean, std = self.get_buffer("text_mean"), self.get_buffer("text_std")
        weight = (self.proj.weight / std).T
        return weight, -(mean @ weight)

    def represent(
        self, text: torch.Tensor, ids: torch.Tensor, id_dropout: float = 0.0
    ) -> torch.Tensor:
        """Item representations from text vectors (n, text_dim) and vocabulary ids (n,; or
        ``self.items`` for an item without a learned id)."""
        rep = self.text_part(text)
        emb = self.ids(ids)
        if id_dropout > 0.0 and self.training:
            emb = emb * (torch.rand(emb.shape[0], 1, device=emb.device) >= id_dropout)
        return rep + emb

    def hidden(self, seq_reps: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (b, L, dim) for left-aligned, padded sequences of item representations;
        ``lengths`` (b,) counts each row's real items (all ``L`` when omitted).

        Padding sits after the last real item and attention is causal, so no real position ever
        attends to padding. The layers therefore run on the real positions alone: the linear
        maps on all of them packed together, attention on groups of rows of similar length,
        each padded only to its own longest row. Most histories are far shorter than the
        longest one in a batch, so padding would otherwise be most of the work. At real
        positions the result is what ``self.encoder(x, mask=causal)`` computes; padded positions
        hold ``seq_reps`` alone and mean nothing.
        """
        rows, length, _ = seq_reps.shape
        device = seq_reps.device
        if lengths is None:
            lengths = torch.full((rows,), length, dtype=torch.long, device=device)
        order = torch.argsort(lengths)
        lens = lengths[order]
        real = torch.arange(length, device=device)[None] < lens[:, None]
        x = self.norm(seq_reps[order] + self.pos.weight[:length][None])
        h = _dropout(x[real], self.cfg.dropout, self.training)
        groups = _groups(lens.tolist())
        for layer in cast(list[nn.TransformerEncoderLayer], self.encoder.layers):
            h = h + self._attend(layer, layer.norm1(h), real, groups)
            inner = _dropout(
                layer.activation(layer.linear1(layer.norm2(h))), self.cfg.dropout, self.training
            )
            h = h + _dropout(layer.linear2(inner), self.cfg.dropout, self.training)
        out = torch.zeros_like(seq_reps)
        out[order[:, None].expand(-1, length)[real], real.nonzero()[:, 1]] = h
        return out + seq_reps

    def last_hidden(self, seq_reps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Each row's hidden state at its last real item (rows of length 0 are not allowed)."""
        rows = torch.arange(len(lengths), device=seq_reps.device)
        return self.hidden(seq_reps, lengths)[rows, lengths - 1]

    def _attend(
        self,
        layer: nn.TransformerEncoderLayer,
        h: torch.Tensor,
        real: torch.Tensor,
        groups: list[tuple[int, int, int, int, int]],
    ) -> torch.Tensor:
        """One layer's causal self-attention over the packed positions ``h`` (n, dim), whose
        layout is ``real`` (b, L), rows sorted by length; the layer's own weights and heads."""
        attn: nn.MultiheadAttention = layer.self_attn
        heads, dim = self.cfg.heads, self.cfg.dim
        qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
        mixed = torch.empty_like(h)
        for first, last, width, begin, end in groups:
            mask = real[first:last, :width]
            block = qkv.new_zeros(last - first, width, 3 * dim)
            block[mask] = qkv[begin:end]
            q, k, v = block.view(last - first, width, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
            weights = (q @ k.transpose(-1, -2)) * (dim // heads) ** -0.5
            causal = torch.ones(width, width, dtype=torch.bool, device=h.device).triu(1)
            weights = torch.softmax(weights.masked_fill(causal, float("-inf")), dim=-1)
            weights = _dropout(weights, self.cfg.dropout, self.training)
            mixed[begin:end] = (weights @ v).transpose(1, 2).reshape(last - first, width, dim)[mask]
        return _dropout(attn.out_proj(mixed), self.cfg.dropout, self.training)

    def scores(self, hidden: torch.Tensor, reps: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """Cosine of each hidden state with each item representation, times ``scale``."""
        return (F.normalize(hidden, dim=-1) * scale) @ F.normalize(reps, dim=-1).T


def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout from a uniform draw: the same distribution as ``F.dropout``, and on CPU
    several times faster than its Bernoulli sampler."""
    if not training or p <= 0.0:
        return x
    return x * (torch.rand_like(x) >= p) * (1.0 / (1.0 - p))


def _groups(lengths: list[int], bound: float = 1.5) -> list[tuple[int, int, int, int, int]]:
    """Split rows sorted by ascending length into runs whose longest row is at most ``bound``
    times their shortest (or 4 longer); each run is (first row, end row, its padded width,
    first packed position, end packed position). Attention pads a run only to its own width."""
    out = []
    first = begin = 0
    while first < len(lengths):
        last, end = first, begin
        while last < len(lengths) and (
            lengths[last] <= max(lengths[first] * bound, lengths[first] + 4)
        ):
            end += lengths[last]
            last += 1
        if lengths[last - 1] > 0:
            out.append((first, last, lengths[last - 1], begin, end))
        first, begin = last, end
    return out


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


def mask_history(
    logits: torch.Tensor, inputs: torch.Tensor, keep: torch.Tensor, targets: torch.Tensor, pad: int
) -> torch.Tensor:
    """Leave each position's earlier items (its input prefix) out of its softmax, except the
    target itself: serving never recommends them, so the model need not learn to push them down.
    """
    length = inputs.shape[1]
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=inputs.device))
    prefix = inputs[:, None, :].expand(-1, length, -1).masked_fill(~causal, pad)[keep]
    blocked = torch.zeros(logits.shape[0], pad + 1, dtype=torch.bool, device=logits.device)
    blocked.scatter_(1, prefix, True)
    blocked = blocked[:, :pad]
    blocked[torch.arange(len(targets), device=logits.device), targets] = False
    return logits.masked_fill(blocked, float("-inf"))


def unit_reps(models: Sequence[SeqModel], text: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The members' unit item representations side by side: a dot product with a user vector
    built the same way (unit hidden states side by side, over the member count) is the members'
    mean cosine."""
    return torch.cat([F.normalize(m.represent(text, ids), dim=-1) for m in models], dim=1)


def train_epoch(
    model: SeqModel,
    opt: torch.optim.Optimizer,
    text: torch.Tensor,
    inputs: torch.Tensor,
    outputs: torch.Tensor,
    *,
    batches: Iterable[torch.Tensor],
    masked: bool = True,
    after_step: Callable[[int], None] | None = None,
    smoothing: float = 0.0,
    contrast: float = 0.0,
    contrast_temperature: float = 0.1,
) -> float:
    """One pass over ``batches`` (row indices into the right-padded ``inputs``/``outputs``, pad =
    ``model.items``): a full softmax over the vocabulary at every real position, each position's
    earlier items left out of it when ``masked``. Each batch is cut to its longest row;
    ``after_step`` hears the count of rows done after each step. Returns the mean loss per
    target."""
    cfg, pad = model.cfg, model.items
    all_ids = torch.arange(pad, device=text.device)
    model.train()
    total = count = 0.0
    rows = 0
    for batch in batches:
        lengths = (inputs[batch] != pad).sum(1)
        width = int(lengths.max())  # the batch's longest row; the rest is padding
        x, y = inputs[batch][:, :width], outputs[batch][:, :width]
        reps = model.represent(text, all_ids, cfg.id_dropout)
        seq_reps = torch.cat([reps, torch.zeros_like(reps[:1])])[x]
        hidden = model.hidden(seq_reps, lengths)
        keep = y != pad
        logits = model.scores(hidden[keep], reps, 1.0 / cfg.temperature)
        if masked:
            logits = mask_history(logits, x, keep, y[keep], pad)
        loss = _next_item_loss(logits, y[keep], smoothing)
        if contrast > 0.0:
            loss = loss + contrast * _dropout_contrast(
                model, seq_reps, lengths, hidden, contrast_temperature
            )
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item() * int(keep.sum())
        count += int(keep.sum())
        rows += len(batch)
        if after_step is not None:
            after_step(rows)
    return total / max(count, 1)


def _next_item_loss(logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Cross-entropy of the next item; with ``smoothing`` the target keeps that share less of the
    label, spread evenly over the items still in the softmax (masked ones stay out of it)."""
    if smoothing <= 0.0:
        return F.cross_entropy(logits, targets)
    logp = F.log_softmax(logits, dim=-1)
    nll = -logp.gather(1, targets[:, None]).squeeze(1)
    open_ = torch.isfinite(logits)
    spread = -(logp.masked_fill(~open_, 0.0).sum(1) / open_.sum(1))
    return ((1.0 - smoothing) * nll + smoothing * spread).mean()


def _dropout_contrast(
    model: SeqModel,
    seq_reps: torch.Tensor,
    lengths: torch.Tensor,
    hidden: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Contrastive regulariser over dropout views (as in DuoRec's unsupervised augmentation): the
    same histories run through the layers a second time, with fresh dropout; each row's last state
    must pick its own second view out of the batch's."""
    rows = torch.arange(len(lengths), device=seq_reps.device)
    again = model.hidden(seq_reps, lengths)
    a = F.normalize(hidden[rows, lengths - 1], dim=-1)
    b = F.normalize(again[rows, lengths - 1], dim=-1)
    logits = a @ b.T / temperature
    return 0.5 * (F.cross_entropy(logits, rows) + F.cross_entropy(logits.T, rows))
