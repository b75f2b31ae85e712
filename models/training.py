"""``recstream train LOG --out MODEL_DIR``: learn the ranking from an event log.

One recipe for every dataset:

1. Hold out validation events: each user's second-to-last item (``loo``: the test item after it is
   never read), or the prequential targets of a later time slice (``time``: 80 % of the log's time
   order trains, the next 10 % validates, the last 10 % is never read).
2. Fit the fusion f(x, z) = x W1 + z W2 with a softmax over all items' text vectors, on every
   training prefix (x and z built by the same functions as the stream's user state).
3. Train the sequential model on the training sequences (next-item softmax at every position);
   keep the epoch with the best validation NDCG@10 (early stopping).
4. Fit the re-ranker's signal weights on the validation events, through the production
   recommender over an embedded vector store, as ``recstream eval --model-dir`` serves it.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import structlog
import torch
import torch.nn.functional as F

from infra.cli import UserError, load_cli_settings
from infra.settings import Settings
from models.evaluation.baselines import Ranker, Request, Step, apply_step
from models.evaluation.cli import Embeddings, described, embed_reviews, textless_items
from models.evaluation.data import Dataset, distinct_sequence, load_dataset
from models.evaluation.protocols import Progress
from models.ranking import Ranked
from models.recommender import Gathered
from models.reranker import choose_reranker
from models.sequential import SeqConfig, SeqModel, pad_right, train_epoch, unit_reps
from models.state import Fusion, UserState, behaviour_vector, review_key, text_vector
from models.trained import TrainedModel, fingerprint, write_model_dir
from schemas.scoring import hit, ndcg

log = structlog.get_logger(__name__)
T = TypeVar("T")
K = 10
TIME_TRAIN, TIME_VALID = 0.8, 0.9


@dataclass(frozen=True)
class Recipe:
    """Training hyper-parameters: fixed, the same for every dataset."""

    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 256
    max_epochs: int = 40
    # Epochs without a better validation NDCG@10 before a member stops. It climbs slowly and
    # noisily: with 4, members of two runs of one recipe stopped at epochs 13 and 23, at
    # plateaus that later epochs left behind (docs/training.md).
    patience: int = 8
    fusion_epochs: int = 5
    fusion_temperature: float = 0.05
    mask_history: bool = True  # as evaluation and serving do: earlier items are no candidates
    ensemble: int = 2  # sequential models from consecutive seeds, their cosines averaged
    seed: int = 0

    def stops(self, epoch: int, best_epoch: int) -> bool:
        """Whether a member stops after ``epoch``, its best so far having been ``best_epoch``."""
        return epoch - best_epoch >= self.patience


@dataclass
class Holdout:
    """Training steps per user and the validation requests (history -> target)."""

    kind: str
    train: dict[str, list[Step]]
    valid: list[tuple[Request, str]]
    trained_until_ts: int | None  # events at or after this time were not read (time holdout)
    # Time holdout: the validation window's steps in time order, with the index of the validation
    # target each one is (None for a user's first step). Walking it lets co-visitation and
    # popularity learn through the window as they do in the stream.
    stream: list[tuple[str, Step, int | None]] = field(default_factory=list)


def holdout(data: Dataset, kind: str) -> Holdout:
    """Split ``data`` for training; test events are dropped before anything reads them."""
    if kind == "loo":
        train: dict[str, list[Step]] = {}
        valid: list[tuple[Request, str]] = []
        for user, inters in data.by_user.items():
            seq = distinct_sequence(inters)
            train[user] = seq[:-2]
            if len(seq) >= 3:
                hist = seq[:-2]
                valid.append(
                    (Request(user, hist, {s[0].item_id for s in hist}), seq[-2][0].item_id)
                )
        return Holdout(kind, train, valid, None)
    times = sorted(i.ts for i in data.interactions)
    if not times:
        raise UserError("the log has no interactions to train on")
    train_cut = times[min(len(times) - 1, int(len(times) * TIME_TRAIN))]
    valid_cut = times[min(len(times) - 1, int(len(times) * TIME_VALID))]
    if valid_cut <= train_cut:
        raise UserError(
            "the log's events span too little time for a time holdout; use --holdout loo"
        )
    steps: dict[str, list[Step]] = defaultdict(list)
    valid = []
    stream: list[tuple[str, Step, int | None]] = []
    for inter in data.interactions:
        if inter.ts >= valid_cut:
            break
        hist = steps[inter.user_id]
        if hist and hist[-1][-1].item_id == inter.item_id:
            hist[-1].append(inter)
            continue
        target = None
        if inter.ts >= train_cut and hist:
            target = len(valid)
            valid.append(
                (Request(inter.user_id, list(hist), {s[0].item_id for s in hist}), inter.item_id)
            )
        hist.append([inter])
        if inter.ts >= train_cut:
            stream.append((inter.user_id, hist[-1], target))
    train = {u: [s for s in seq if s[0].ts < train_cut] for u, seq in steps.items()}
    return Holdout(kind, train, valid, int(valid_cut), stream)


def pick_device(settings: Settings) -> torch.device:
    wanted = settings.encoder.device
    if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


class Trainer:
    def __init__(self, data: Dataset, split: Holdout, settings: Settings, recipe: Recipe) -> None:
        self.data, self.split, self.settings, self.recipe = data, split, settings, recipe
        self.device = pick_device(settings)
        self.ids = data.catalogue
        emb = Embeddings(settings)
        self.reviews = embed_reviews(data, emb)
        # Items without catalogue text are described by the reviews in the training part only.
        trained_on = {i.event_id for steps in split.train.values() for s in steps for i in s}
        self.base_vectors = emb.of([data.item_text[i] for i in self.ids], "items")
        self.vectors = described(
            data, self.base_vectors, self.reviews, lambda r: r.event_id in trained_on
        )
        self.vec_of = dict(zip(self.ids, self.vectors, strict=True))
        seen = dict.fromkeys(s[0].item_id for steps in split.train.values() for s in steps)
        self.vocab = [i for i in self.ids if i in seen]
        self.index = {i: n for n, i in enumerate(self.vocab)}

    # --- fusion ------------------------------------------------------------------------------

    def fusion(self) -> tuple[Fusion, dict[str, float]]:
        """W1, W2 by a softmax over item text vectors, from every training prefix."""
        xs, zs, has_z, targets = [], [], [], []
        cat_index = {i: n for n, i in enumerate(self.ids)}
        half_life = self.settings.ranking.half_life_events
        review_vecs = {review_key(e): v for e, (_, v) in self.reviews.items()}
        for steps in self.split.train.values():
            state = UserState()
            for n, step in enumerate(steps):
                if n > 0:
                    x = behaviour_vector(state, self.vec_of, half_life)
                    if x is not None:
                        z = text_vector(state, review_vecs)
                        xs.append(x)
                        zs.append(z if z is not None else np.zeros_like(x))
                        has_z.append(z is not None)
                        targets.append(cat_index[step[0].item_id])
                apply_step(state, step, self.settings.ranking.recent_items)
        a = self.settings.ranking.behaviour_weight
        dim = self.vectors.shape[1]
        if not xs:
            return Fusion.untrained(a), {}
        dev = self.device
        X = torch.tensor(np.stack(xs), device=dev)
        Z = torch.tensor(np.stack(zs), device=dev)
        Y = torch.tensor(targets, device=dev)
        items = torch.tensor(self.vectors, device=dev)
        w1 = (torch.eye(dim, device=dev) * a).requires_grad_()
        w2 = (torch.eye(dim, device=dev) * (1 - a)).requires_grad_()
        opt = torch.optim.Adam([w1, w2], lr=self.recipe.lr)
        gen = torch.Generator().manual_seed(self.recipe.seed)
        loss_value = math.nan
        for epoch in range(self.recipe.fusion_epochs):
            perm = torch.randperm(len(X), generator=gen).to(dev)
            total = 0.0
            for start in range(0, len(X), 1024):
                b = perm[start : start + 1024]
                q = F.normalize(X[b] @ w1 + Z[b] @ w2, dim=-1)
                loss = F.cross_entropy(q @ items.T / self.recipe.fusion_temperature, Y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(b)
            loss_value = total / len(X)
            print(
                f"fusion epoch {epoch + 1}/{self.recipe.fusion_epochs}  loss {loss_value:.4f}",
                file=sys.stderr,
                flush=True,
            )
        fusion = Fusion(w1.detach().cpu().numpy(), w2.detach().cpu().numpy())
        return fusion, {
            "loss": round(loss_value, 4),
            "prefixes": len(xs),
            "with_reviews": int(sum(has_z)),
        }

    # --- sequential model ----------------------------------------------------------------------

    def sequential(self, cfg: SeqConfig, seed: int) -> tuple[SeqModel, dict[str, Any]]:
        """One member: trained until validation NDCG@10 stops improving; the best epoch kept."""
        rc = self.recipe
        torch.manual_seed(seed)
        model = SeqModel(cfg, len(self.vocab)).to(self.device)
        text = torch.tensor(np.stack([self.vec_of[i] for i in self.vocab]), device=self.device)
        model.set_text_stats(torch.tensor(self.vectors, device=self.device))
        pad = len(self.vocab)
        seqs = [[self.index[s[0].item_id] for s in steps] for steps in self.split.train.values()]
        seqs = [s[-(cfg.max_len + 1) :] for s in seqs if len(s) >= 2]
        inputs, _ = pad_right([s[:-1] for s in seqs], cfg.max_len, pad)
        outputs, _ = pad_right([s[1:] for s in seqs], cfg.max_len, pad)
        X = torch.tensor(inputs, device=self.device)
        Y = torch.tensor(outputs, device=self.device)
        opt = torch.optim.AdamW(model.parameters(), lr=rc.lr, weight_decay=rc.weight_decay)
        gen = torch.Generator().manual_seed(seed)
        best: tuple[float, int, dict[str, torch.Tensor]] = (-1.0, 0, {})
        history = []
        for epoch in range(1, rc.max_epochs + 1):
            started = time.monotonic()
            perm = torch.randperm(len(X), generator=gen).to(self.device)
            progress = Progress(f"seed {seed} epoch {epoch}", len(X))
            loss = train_epoch(
                model,
                opt,
                text,
                X,
                Y,
                batches=perm.split(rc.batch_size),
                masked=rc.mask_history,
                after_step=progress.update,
            )
            metrics = self.seq_metrics([model], text)
            history.append({"epoch": epoch, "loss": round(loss, 4), **metrics})
            print(
                f"seed {seed} epoch {epoch}/{rc.max_epochs}  loss {loss:.4f}  "
                f"valid HR@{K} {metrics['HR@10']:.4f}  NDCG@{K} {metrics['NDCG@10']:.4f}  "
                f"({time.monotonic() - started:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
            if metrics["NDCG@10"] > best[0]:
                state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                best = (metrics["NDCG@10"], epoch, state)
            elif rc.stops(epoch, best[1]):
                break
        model.load_state_dict(best[2])
        model.eval()
        return model, {"best_epoch": best[1], "epochs": history}

    @torch.inference_mode()
    def seq_metrics(self, models: Sequence[SeqModel], text: torch.Tensor) -> dict[str, float]:
        """HR@10 and NDCG@10 of the sequential models alone (mean cosine) on the validation
        targets, history masked."""
        for model in models:
            model.eval()
        cfg = models[0].cfg
        ids_all = torch.arange(len(self.vocab), device=self.device)
        reps = [m.represent(text, ids_all) for m in models]
        padded = [torch.cat([r, torch.zeros_like(r[:1])]) for r in reps]
        hits = gains = 0.0
        rows = [(r, t) for r, t in self.split.valid if t in self.index]
        for start in range(0, len(rows), 1024):
            chunk = rows[start : start + 1024]
            hist = [
                [self.index[s[0].item_id] for s in r.history if s[0].item_id in self.index]
                for r, _ in chunk
            ]
            keep = [n for n, h in enumerate(hist) if h]
            if not keep:
                continue
            ids, last = pad_right([hist[n] for n in keep], cfg.max_len, len(self.vocab))
            index = torch.tensor(ids, device=self.device)
            ends = torch.tensor(last, device=self.device)
            scores = torch.stack(
                [
                    m.scores(m.last_hidden(p[index], ends + 1), r)
                    for m, p, r in zip(models, padded, reps, strict=True)
                ]
            ).sum(0)
            found = scores.cpu().numpy()
            for row, n in enumerate(keep):
                found[row, hist[n]] = -np.inf
                top = np.argpartition(-found[row], K)[:K]
                top = top[np.argsort(-found[row][top])]
                shown = [self.vocab[i] for i in top]
                hits += hit(shown, chunk[n][1], K)
                gains += ndcg(shown, chunk[n][1], K)
        n = max(len(self.split.valid), 1)
        return {"HR@10": round(hits / n, 4), "NDCG@10": round(gains / n, 4)}

    def item_reps(self, models: Sequence[SeqModel]) -> np.ndarray:
        """The vocabulary's unit representations, the members' side by side."""
        with torch.inference_mode():
            text = torch.tensor(np.stack([self.vec_of[i] for i in self.vocab]))
            ids = torch.arange(len(self.vocab))
            return unit_reps(models, text, ids).numpy()

    def counts(self) -> np.ndarray:
        """Each vocabulary item's interactions in the training part (steps of the users'
        distinct-item sequences), in vocabulary order."""
        out = np.zeros(len(self.vocab), dtype=np.float32)
        for steps in self.split.train.values():
            for step in steps:
                out[self.index[step[0].item_id]] += 1
        return out

    # --- re-ranker -----------------------------------------------------------------------------

    def ranker(self, model: TrainedModel, workdir: Path) -> Ranker:
        """The production recommender over an embedded store, fed the training steps."""
        ranking = self.settings.ranking.model_copy(update={"k": K})
        ranker = Ranker.build(
            workdir,
            item_ids=self.ids,
            item_vectors=self.base_vectors,  # profiles come from the reviews it observes
            titles=self.data.item_title,
            reviews=self.reviews,
            ranking=ranking,
            fusion=model.fusion,
            model=model,
            name="trained",
            textless=textless_items(self.data),
        )
        for user, steps in self.split.train.items():
            for step in steps:
                ranker.observe(user, step)
        return ranker


def _walk(
    ranker: Ranker,
    split: Holdout,
    each: Callable[[list[Request]], list[T]],
    label: str,
) -> list[T]:
    """``each`` over the validation requests, in order. Leave-one-out validation is static: the
    requests go in batches. A time holdout's window is walked in time order, the ranker observing
    each step after its target was served, as the stream would."""
    out: list[T] = []
    progress = Progress(label, len(split.valid))
    if not split.stream:
        requests = [r for r, _ in split.valid]
        for start in range(0, len(requests), 512):
            out.extend(each(requests[start : start + 512]))
            progress.update(len(out))
    else:
        for user, step, target in split.stream:
            if target is not None:
                out.extend(each([split.valid[target][0]]))
                progress.update(len(out))
            ranker.observe(user, step)
    progress.update(len(out), final=True)
    return out


def _each_request(batch: Gathered) -> list[tuple[Gathered, int]]:
    return [(batch, n) for n in range(len(batch.inputs))]


def _rank_gathered(
    ranker: Ranker, model: TrainedModel, gathered: Sequence[tuple[Gathered, int]]
) -> list[list[str]]:
    """The top K of each gathered request, ranked by ``model``'s re-ranker (a batch at a time)."""
    shown: list[list[str]] = []
    ranked: list[list[Ranked]] = []
    last: Gathered | None = None
    for batch, n in gathered:
        if batch is not last:
            ranked, last = ranker.recommender.rank_gathered(batch, model), batch
        shown.append([r.item_id for r in ranked[n]][:K])
    return shown


def train(
    log_path: Path, out: Path, settings: Settings, recipe: Recipe, kind: str
) -> dict[str, Any]:
    """Train every part and write the model directory; returns the manifest."""
    started = time.monotonic()
    try:
        data = load_dataset(log_path)
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None
    if not data.interactions:
        raise UserError(f"{log_path} has no interactions to train on")
    split = holdout(data, kind)
    if not split.valid:
        raise UserError("no validation events: users need at least three distinct items")
    trainer = Trainer(data, split, settings, recipe)
    log.info(
        "training",
        users=len(split.train),
        valid=len(split.valid),
        items=len(trainer.vocab),
        device=str(trainer.device),
    )
    fusion, fusion_info = trainer.fusion()
    cfg = SeqConfig(text_dim=int(trainer.vectors.shape[1]))
    members = []
    for seed in range(recipe.seed, recipe.seed + recipe.ensemble):
        seq, info = trainer.sequential(cfg, seed)
        members.append((seq.cpu(), info))
    seqs = [m for m, _ in members]
    text = torch.tensor(np.stack([trainer.vec_of[i] for i in trainer.vocab]))
    trainer.device = torch.device("cpu")
    ensemble_metrics = trainer.seq_metrics(seqs, text)
    digest = fingerprint(log_path)
    created = datetime.now(UTC)
    version = (
        f"{created:%Y%m%dT%H%M%SZ}-{hashlib.sha256((digest + repr(cfg)).encode()).hexdigest()[:8]}"
    )
    from models.reranker import Reranker

    model = TrainedModel(
        version,
        {},
        Fusion(fusion.w1, fusion.w2, version),
        seqs,
        trainer.vocab,
        trainer.item_reps(seqs),
        trainer.counts(),
        Reranker.default(),
    )
    targets = [t for _, t in split.valid]
    with tempfile.TemporaryDirectory(prefix="recstream-train-") as tmp:
        ranker = trainer.ranker(model, Path(tmp) / "signals")
        try:
            # Each validation request's gathered batch and its place in it: the re-ranker is
            # fitted on the batches' signals, then the same batches are ranked with it.
            gathered = _walk(
                ranker,
                split,
                lambda reqs: _each_request(ranker.gather(reqs)),
                "re-ranker signals",
            )
            lists = [batch.signals[n] for batch, n in gathered if batch.signals is not None]
            recall = sum(t in s.items for s, t in zip(lists, targets, strict=True)) / len(targets)
            model.reranker, reranker_cv = choose_reranker(lists, targets)
            log.info("reranker", **reranker_cv)
            shown = _rank_gathered(ranker, model, gathered)
        finally:
            ranker.recommender.store.close()
    n_valid = max(len(targets), 1)
    valid_metrics = {
        "HR@10": round(sum(hit(s, t, K) for s, t in zip(shown, targets, strict=True)) / n_valid, 4),
        "NDCG@10": round(
            sum(ndcg(s, t, K) for s, t in zip(shown, targets, strict=True)) / n_valid, 4
        ),
    }
    seconds = time.monotonic() - started
    manifest = {
        "version": version,
        "created": created.isoformat(timespec="seconds"),
        "dataset": data.name,
        "data": {
            "path": str(log_path),
            "sha256": digest,
            "interactions": len(data.interactions),
            "users": len(data.by_user),
            "items": len(data.catalogue),
        },
        "holdout": {
            "kind": kind,
            "validation_targets": len(split.valid),
            "trained_until_ts": split.trained_until_ts,
        },
        "settings": {
            "recipe": recipe.__dict__,
            "sequential": cfg.to_dict(),
            "ranking": settings.ranking.model_dump(),
            "encoder": trainer.vectors.shape[1],
        },
        "validation": {
            "sequential": ensemble_metrics,
            "members": [info["epochs"][info["best_epoch"] - 1] for _, info in members],
            "candidate_recall": round(recall, 4),
            "reranker": reranker_cv,
            "recommender": valid_metrics,
        },
        "training": {
            "device": str(trainer.device),
            "seconds": round(seconds, 1),
            "fusion": fusion_info,
            "members": [
                {
                    "seed": recipe.seed + n,
                    "best_epoch": info["best_epoch"],
                    "epochs": info["epochs"],
                }
                for n, (_, info) in enumerate(members)
            ],
        },
        "reranker": model.reranker.to_dict(),
    }
    write_model_dir(
        out,
        manifest=manifest,
        fusion=model.fusion,
        seq_states=[m.state_dict() for m in seqs],
        seq_config=cfg.to_dict(),
        vocab=trainer.vocab,
        item_reps=model.item_reps,
        counts=model.counts,
        reranker=model.reranker,
    )
    return manifest


def cli_train(args: argparse.Namespace) -> int:
    settings = load_cli_settings(args)
    if args.max_epochs < 1:
        raise UserError("--max-epochs must be 1 or more")
    recipe = Recipe(max_epochs=args.max_epochs, seed=args.seed)
    torch.manual_seed(args.seed)
    manifest = train(args.log, args.out, settings, recipe, args.holdout)
    valid = manifest["validation"]["recommender"]
    print(
        f"wrote {args.out} (version {manifest['version']}) "
        f"in {manifest['training']['seconds']:.0f} s; "
        f"validation HR@10 {valid['HR@10']:.4f}, NDCG@10 {valid['NDCG@10']:.4f}"
    )
    return 0
