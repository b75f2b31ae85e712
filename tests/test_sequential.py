"""The sequential model's packed forward pass: it skips padding yet computes what PyTorch's own
transformer computes at every real position, and its training mode is stochastic only where
dropout says so."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.sequential import (
    SeqConfig,
    SeqModel,
    _dropout,
    _dropout_contrast,
    _groups,
    _next_item_loss,
)


def _model(dim: int, heads: int, dropout: float = 0.5) -> SeqModel:
    torch.manual_seed(3)
    model = SeqModel(SeqConfig(dim=dim, heads=heads, dropout=dropout, max_len=40), items=50)
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.2)
    return model


def _reference(model: SeqModel, seq_reps: torch.Tensor) -> torch.Tensor:
    """The plain computation: PyTorch's TransformerEncoder over the whole padded batch."""
    length = seq_reps.shape[1]
    x = model.norm(seq_reps + model.pos.weight[:length][None])
    causal = torch.ones(length, length, dtype=torch.bool).triu(1)
    return model.encoder(x, mask=causal) + seq_reps


@pytest.mark.parametrize(("dim", "heads"), [(32, 2), (64, 4)])
def test_packed_hidden_equals_the_padded_transformer_at_real_positions(
    dim: int, heads: int
) -> None:
    """Rows of lengths 0 to 37 (empty, single, and long rows in several length groups), in
    shuffled order: every real position matches nn.TransformerEncoder with a causal mask to
    float precision, and padded positions hold the input alone."""
    model = _model(dim, heads).eval()
    gen = torch.Generator().manual_seed(5)
    lengths = torch.tensor([37, 0, 1, 2, 9, 3, 15, 1, 30, 6, 4, 22])
    seq_reps = torch.randn(len(lengths), 37, dim, generator=gen)
    real = torch.arange(37)[None] < lengths[:, None]
    seq_reps[~real] = 0.0
    with torch.no_grad():
        packed = model.hidden(seq_reps, lengths)
        expected = _reference(model, seq_reps)
    assert torch.allclose(packed[real], expected[real], atol=1e-5)
    assert torch.equal(packed[~real], seq_reps[~real])
    with torch.no_grad():
        full = model.hidden(seq_reps[:1])
    assert torch.allclose(full, expected[:1], atol=1e-5)


def test_training_mode_is_deterministic_without_dropout_and_random_with_it() -> None:
    """With dropout 0 the training-mode pass equals the evaluation-mode pass (nothing random is
    left); with dropout 0.5 two training passes differ and gradients reach every layer."""
    lengths = torch.tensor([5, 2, 8])
    seq_reps = torch.randn(3, 8, 32)
    plain = _model(32, 2, dropout=0.0)
    with torch.no_grad():
        assert torch.allclose(
            plain.train().hidden(seq_reps, lengths), plain.eval().hidden(seq_reps, lengths)
        )
    noisy = _model(32, 2, dropout=0.5).train()
    first, second = noisy.hidden(seq_reps, lengths), noisy.hidden(seq_reps, lengths)
    real = torch.arange(8)[None] < lengths[:, None]
    assert not torch.allclose(first[real], second[real])
    first[real].sum().backward()
    for name, param in noisy.encoder.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


def test_dropout_keeps_the_expected_value() -> None:
    """Inverted dropout at p=0.5 zeroes about half the entries and doubles the rest, so the mean
    is kept; p=0 and evaluation mode return the input untouched."""
    x = torch.ones(200_000)
    out = _dropout(x, 0.5, training=True)
    assert set(out.unique().tolist()) == {0.0, 2.0}
    assert abs(float((out == 0).float().mean()) - 0.5) < 0.01
    assert abs(float(out.mean()) - 1.0) < 0.02
    assert _dropout(x, 0.0, training=True) is x
    assert _dropout(x, 0.5, training=False) is x


def test_length_groups_cover_every_row_once() -> None:
    """Sorted lengths split into runs, each padded to its own longest row and bounded in spread;
    every non-empty row is in exactly one run, the packed offsets add up, and a run of empty rows
    alone is skipped."""
    lengths = [1, 1, 2, 3, 5, 8, 9, 13, 20, 21, 50]
    groups = _groups(lengths)
    covered = [row for first, last, *_ in groups for row in range(first, last)]
    assert covered == list(range(len(lengths)))
    for first, last, width, begin, end in groups:
        assert width == lengths[last - 1]
        assert width <= max(lengths[first] * 1.5, lengths[first] + 4)
        assert end - begin == sum(lengths[first:last])
    assert groups[-1][4] == sum(lengths)
    assert len(groups) == 5
    assert _groups([0, 0, 0]) == []
    assert _groups([0, 0, 7]) == [(2, 3, 7, 0, 7)]


def test_label_smoothing_spreads_over_open_items_only() -> None:
    """Without smoothing the loss is plain cross-entropy; with it, the share taken from the target
    goes to the items still in the softmax: masked (-inf) items add nothing and the loss stays
    finite, equal to the hand-computed mixture."""
    logits = torch.tensor([[2.0, 0.5, float("-inf"), -1.0], [0.0, float("-inf"), 1.0, 3.0]])
    targets = torch.tensor([0, 3])
    assert torch.allclose(_next_item_loss(logits, targets, 0.0), F.cross_entropy(logits, targets))
    loss = _next_item_loss(logits, targets, 0.2)
    logp = F.log_softmax(logits, dim=-1)
    row0 = 0.8 * -logp[0, 0] + 0.2 * -(logp[0, 0] + logp[0, 1] + logp[0, 3]) / 3
    row1 = 0.8 * -logp[1, 3] + 0.2 * -(logp[1, 0] + logp[1, 2] + logp[1, 3]) / 3
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(((row0 + row1) / 2).item(), rel=1e-6)


def test_dropout_contrast_is_low_without_dropout_and_higher_with_it() -> None:
    """Two dropout views of the same histories: with no dropout the views are identical, so each
    row finds its own view far more surely than with heavy dropout."""
    histories = torch.tensor([[0, 1, 2, 50], [3, 4, 50, 50], [5, 6, 7, 8], [9, 50, 50, 50]])
    lengths = (histories != 50).sum(1)

    def contrast(dropout: float) -> float:
        model = _model(32, 2, dropout)
        model.train()
        reps = model.represent(torch.randn(50, 384), torch.arange(50))
        padded = torch.cat([reps, torch.zeros_like(reps[:1])])
        hidden = model.hidden(padded[histories], lengths)
        return _dropout_contrast(model, padded[histories], lengths, hidden, 0.1).item()

    torch.manual_seed(0)
    calm, noisy = contrast(0.0), contrast(0.9)
    assert calm < 0.05
    assert noisy > calm + 0.1
