"""Hyper-parameter sweep of the sequential model on validation events only.

Two steps, so the sweep can run where only torch and numpy are installed (a GPU machine):

    python benchmarks/seq_sweep.py export sci.parquet sci.pkl      # here: holdout, text vectors
    python benchmarks/seq_sweep.py run sci.pkl '{"name":"base"}' '{"name":"d256","dim":256}' ...

``export`` makes the leave-one-out holdout of ``recstream train`` (test items never read) and
writes the training sequences, the validation (history, target) pairs and the vocabulary's
MiniLM vectors. ``run`` trains each spec with the training loop of ``recstream train`` (full
softmax, history masked, early stopping on validation NDCG@10) for ``seeds`` seeds and prints one
JSON line per spec: each member's best epoch and validation HR@10 / NDCG@10, and the ensemble's
after each member. A spec's keys are ``SeqConfig`` fields plus ``seeds``, ``lr``, ``wd``, ``bs``,
``max_epochs``, ``patience``, ``ffn`` (feed-forward width as a multiple of ``dim``), ``bucket``
(batches of users of similar history length; faster, but it cost accuracy here) and ``plateau``
(halve the learning rate after two epochs without improvement), ``ema`` (evaluate an
exponential moving average of the weights, this decay per step), ``smooth`` (label smoothing),
``cl`` and ``cl_temp`` (weight and temperature of the contrastive term over dropout views),
``cosine`` (learning rate on a half cosine that reaches 0 at this epoch) and ``mlp`` (a two-layer
text adaptor whose hidden width is this multiple of ``dim``, in place of the linear projection).
"""

from __future__ import annotations

import copy
import json
import math
import pickle
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.sequential import SeqConfig, SeqModel, pad_right, train_epoch

K = 10


def export(log: Path, out: Path) -> None:
    from infra.settings import Settings
    from models.evaluation.data import load_dataset
    from models.training import Recipe, Trainer, holdout

    data = load_dataset(log)
    split = holdout(data, "loo")
    trainer = Trainer(data, split, Settings(), Recipe())
    index = trainer.index
    valid = [
        ([index[s[0].item_id] for s in r.history if s[0].item_id in index], index[t])
        for r, t in split.valid
        if t in index
    ]
    payload = {
        "text": np.stack([trainer.vec_of[i] for i in trainer.vocab]).astype(np.float32),
        "catalogue": trainer.vectors.astype(np.float32),
        "seqs": [[index[s[0].item_id] for s in steps] for steps in split.train.values()],
        "valid": valid,
        "n_valid": len(split.valid),
    }
    with out.open("wb") as fh:
        pickle.dump(payload, fh)
    print(f"{out}: {len(trainer.vocab)} items, {len(payload['seqs'])} users, {len(valid)} targets")


def run(data: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:  # noqa: PLR0915
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = dict(spec)
    name = spec.pop("name")
    seeds, lr, wd = spec.pop("seeds", 1), spec.pop("lr", 1e-3), spec.pop("wd", 0.01)
    bs, max_epochs, patience = (
        spec.pop("bs", 256),
        spec.pop("max_epochs", 40),
        spec.pop("patience", 4),
    )
    ffn, bucket, plateau = spec.pop("ffn", 2), spec.pop("bucket", False), spec.pop("plateau", 0.0)
    ema = spec.pop("ema", 0.0)
    smoothing, contrast = spec.pop("smooth", 0.0), spec.pop("cl", 0.0)
    cl_temp, cosine, adaptor = spec.pop("cl_temp", 0.1), spec.pop("cosine", 0), spec.pop("mlp", 0)
    cfg = SeqConfig(**spec)
    text = torch.tensor(data["text"], device=dev)
    n = pad = len(text)
    seqs = [s[-(cfg.max_len + 1) :] for s in data["seqs"] if len(s) >= 2]
    xs = torch.tensor(pad_right([s[:-1] for s in seqs], cfg.max_len, pad)[0], device=dev)
    ys = torch.tensor(pad_right([s[1:] for s in seqs], cfg.max_len, pad)[0], device=dev)
    lens = (xs != pad).sum(1)
    valid = [(h, t) for h, t in data["valid"] if h]
    v_ids, v_last = pad_right([h for h, _ in valid], cfg.max_len, pad)
    vi, vlast = torch.tensor(v_ids, device=dev), torch.tensor(v_last, device=dev)
    vt = torch.tensor([t for _, t in valid], device=dev)
    seen = torch.zeros(len(valid), n + 1, dtype=torch.bool, device=dev)
    seen.scatter_(1, vi, True)
    seen = seen[:, :n]
    all_ids = torch.arange(n, device=dev)
    discount = 1.0 / torch.log2(torch.arange(2, K + 2, device=dev).float())

    def metric(scores: torch.Tensor) -> tuple[float, float]:
        top = scores.masked_fill(seen, -math.inf).topk(K, dim=1).indices
        found = (top == vt[:, None]).float()
        return (found.sum() / data["n_valid"]).item(), (
            (found * discount).sum() / data["n_valid"]
        ).item()

    def scores_of(model: SeqModel) -> torch.Tensor:
        model.eval()
        with torch.inference_mode():
            reps = model.represent(text, all_ids)
            padded = torch.cat([reps, torch.zeros_like(reps[:1])])
            out = []
            for s in range(0, len(vi), 2048):
                rows, last = vi[s : s + 2048], vlast[s : s + 2048]
                out.append(model.scores(model.last_hidden(padded[rows], last + 1), reps))
            return torch.cat(out)

    members: list[dict[str, Any]] = []
    ensemble = None
    started = time.time()
    for seed in range(seeds):
        torch.manual_seed(seed)
        model = SeqModel(cfg, n).to(dev)
        if ffn != 2:
            layer = torch.nn.TransformerEncoderLayer(
                cfg.dim, cfg.heads, cfg.dim * ffn, cfg.dropout, batch_first=True, norm_first=True
            )
            model.encoder = torch.nn.TransformerEncoder(
                layer, cfg.layers, enable_nested_tensor=False
            ).to(dev)
        if adaptor:
            model.proj = torch.nn.Sequential(
                torch.nn.Linear(cfg.text_dim, cfg.dim * adaptor),
                torch.nn.GELU(),
                torch.nn.Linear(cfg.dim * adaptor, cfg.dim),
            ).to(dev)
        model.set_text_stats(torch.tensor(data["catalogue"], device=dev))
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
        average = copy.deepcopy(model) if ema else model
        gen = torch.Generator().manual_seed(seed)
        best: tuple[float, int, float, torch.Tensor | None] = (-1.0, 0, 0.0, None)
        epoch = 0
        for epoch in range(1, max_epochs + 1):
            if cosine:
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / cosine))
            perm = torch.randperm(len(xs), generator=gen).to(dev)
            if bucket:
                perm = perm[torch.argsort(lens[perm], stable=True)]
            batches = list(perm.split(bs))
            if bucket:
                batches = [batches[i] for i in torch.randperm(len(batches), generator=gen)]

            def step(_rows: int, average: SeqModel = average, model: SeqModel = model) -> None:
                if ema:
                    with torch.no_grad():
                        pairs = zip(average.parameters(), model.parameters(), strict=True)
                        for kept, live in pairs:
                            kept.mul_(ema).add_(live, alpha=1.0 - ema)

            train_epoch(
                model,
                opt,
                text,
                xs,
                ys,
                batches=batches,
                after_step=step,
                smoothing=smoothing,
                contrast=contrast,
                contrast_temperature=cl_temp,
            )
            scores = scores_of(average)
            hr, nd = metric(scores)
            if nd > best[0]:
                best = (nd, epoch, hr, scores.clone())
            elif epoch - best[1] >= patience:
                break
            elif plateau and epoch - best[1] >= 2:
                for group in opt.param_groups:
                    group["lr"] *= plateau
        assert best[3] is not None
        ensemble = best[3] if ensemble is None else ensemble + best[3]
        ens_hr, ens_nd = metric(ensemble)
        members.append(
            {
                "seed": seed,
                "epochs_run": epoch,
                "best_epoch": best[1],
                "HR@10": round(best[2], 4),
                "NDCG@10": round(best[0], 4),
                "ensemble_HR@10": round(ens_hr, 4),
                "ensemble_NDCG@10": round(ens_nd, 4),
            }
        )
    return {
        "name": name,
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "config": cfg.to_dict(),
        "lr": lr,
        "wd": wd,
        "bs": bs,
        "ffn": ffn,
        "bucket": bucket,
        "seconds": round(time.time() - started, 1),
        "members": members,
    }


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "export":
        export(Path(argv[1]), Path(argv[2]))
        return 0
    if len(argv) >= 3 and argv[0] == "run":
        with Path(argv[1]).open("rb") as fh:
            data = pickle.load(fh)
        for raw in argv[2:]:
            print(json.dumps(run(data, json.loads(raw))), flush=True)
        return 0
    print("usage: seq_sweep.py export LOG OUT.pkl | run DATA.pkl SPEC_JSON...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
