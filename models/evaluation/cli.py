"""``recstream eval LOG --out DIR``: baselines and the production ranker side by side."""

from __future__ import annotations

import argparse
import hashlib
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import structlog

from infra.cli import UserError, load_cli_settings
from infra.settings import Settings
from models.encoder import TextEncoder
from models.evaluation.baselines import CoVisit, EvalModel, MostPop, Ranker, TextKnn
from models.evaluation.data import Dataset, Interaction, load_dataset
from models.evaluation.protocols import Progress, run_loo, run_prequential
from models.evaluation.report import write_results
from models.profiles import REVIEWS, text_source, with_profiles
from models.state import Fusion
from models.trained import TrainedModel, fingerprint, read_manifest

log = structlog.get_logger(__name__)
MODELS = ("mostpop", "covisit", "textknn", "ranker")


def parse_ks(text: str) -> list[int]:
    try:
        ks = sorted({int(k) for k in text.split(",") if k.strip()})
    except ValueError:
        raise UserError(f"--k must be comma-separated whole numbers, not {text!r}") from None
    if not ks or ks[0] < 1:
        raise UserError("--k needs at least one cut-off of 1 or more")
    return ks


def parse_models(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in (*MODELS, "trained")]
    if unknown or not names:
        raise UserError(
            f"unknown model {unknown[0] if unknown else text!r}; choose from {', '.join(MODELS)}"
        )
    return names


class Embeddings:
    """Encoder vectors of texts, cached on disk by content and model version."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._encoder: TextEncoder | None = None

    def encoder(self) -> TextEncoder:
        if self._encoder is None:
            self._encoder = TextEncoder.from_settings(self.settings.encoder)
        return self._encoder

    def of(self, texts: Sequence[str], label: str) -> np.ndarray:
        """Vectors of ``texts`` in order; each distinct text is encoded once and cached."""
        encoder = self.encoder()
        unique = sorted(set(texts))
        digest = hashlib.sha256(encoder.version.encode())
        for text in unique:
            digest.update(text.encode())
            digest.update(b"\0")
        cache = self.settings.data_dir / "eval-cache" / f"{label}-{digest.hexdigest()[:16]}.npy"
        if cache.is_file():
            vectors = np.load(cache)
        else:
            started = time.monotonic()
            progress = Progress(f"embedding {label}", len(unique))
            chunks = []
            for start in range(0, len(unique), 512):
                chunks.append(encoder.encode(unique[start : start + 512]))
                progress.update(start + len(chunks[-1]))
            progress.update(len(unique), final=True)
            vectors = np.concatenate(chunks) if chunks else np.zeros((0, encoder.dim), np.float32)
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.save(cache, vectors)
            log.info(
                "embedded",
                what=label,
                texts=len(unique),
                seconds=round(time.monotonic() - started, 1),
            )
        row = {text: n for n, text in enumerate(unique)}
        return vectors[[row[t] for t in texts]] if texts else vectors


def textless_items(data: Dataset) -> set[str]:
    """The items whose only text is their id: their reviews describe them."""
    return {i for i, text in data.item_text.items() if text_source(text, i) == REVIEWS}


def embed_reviews(data: Dataset, emb: Embeddings) -> dict[str, tuple[str, np.ndarray]]:
    """Every review with text, by event id: (user id, vector). All of the log's reviews are
    embedded (one cache for eval and train); a review's vector is only read once the review is
    in a history or has been observed, so embedding later ones reveals nothing."""
    every = [r for r in data.interactions if r.kind == "review" and r.text]
    if not every:
        return {}
    vectors = emb.of([r.text or "" for r in every], "reviews")
    return {r.event_id: (r.user_id, v) for r, v in zip(every, vectors, strict=True)}


def described(
    data: Dataset,
    vectors: np.ndarray,
    reviews: Mapping[str, tuple[str, np.ndarray]],
    keep: Callable[[Interaction], bool] | None = None,
) -> np.ndarray:
    """The item ``vectors`` (catalogue order), each item without text replaced by the profile of
    its ``reviews`` that ``keep`` admits (every one when None)."""
    textless = textless_items(data)
    if not textless or not reviews:
        return vectors
    return with_profiles(
        data.catalogue,
        vectors,
        textless,
        [
            (r.item_id, r.event_id, reviews[r.event_id][1])
            for r in data.interactions
            if r.event_id in reviews and (keep is None or keep(r))
        ],
    )


def build_models(
    names: Sequence[str],
    data: Dataset,
    settings: Settings,
    *,
    k: int,
    workdir: Path,
    model_dir: Path | None,
) -> list[EvalModel]:
    models: list[EvalModel] = []
    needs_text = any(n in ("textknn", "ranker", "trained") for n in names)
    ids = data.catalogue
    emb = Embeddings(settings) if needs_text else None
    item_vectors = emb.of([data.item_text[i] for i in ids], "items") if emb else None
    by_review = embed_reviews(data, emb) if emb else {}
    textless = textless_items(data)
    for name in names:
        if name == "mostpop":
            models.append(MostPop())
        elif name == "covisit":
            models.append(CoVisit())
        elif name == "textknn":
            assert item_vectors is not None
            models.append(TextKnn(ids, item_vectors, reviews=by_review, textless=textless))
        else:
            assert item_vectors is not None
            fusion = Fusion.untrained(settings.ranking.behaviour_weight)
            trained = None
            if name == "trained":
                if model_dir is None:
                    raise UserError("model 'trained' needs --model-dir")
                trained = TrainedModel.load(model_dir)
                fusion = trained.fusion
            ranking = settings.ranking.model_copy(update={"k": k})
            models.append(
                Ranker.build(
                    workdir / name,
                    item_ids=ids,
                    item_vectors=item_vectors,
                    titles=data.item_title,
                    reviews=by_review,
                    ranking=ranking,
                    fusion=fusion,
                    name=name,
                    model=trained,
                    textless=textless,
                )
            )
    return models


def parse_sweep(text: str | None) -> list[float]:
    if not text:
        return []
    try:
        lams = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--mmr-sweep must be comma-separated numbers, not {text!r}") from None
    if not lams or any(not 0.0 <= v <= 1.0 for v in lams):
        raise UserError("--mmr-sweep lambdas must lie between 0 and 1")
    return sorted(set(lams), reverse=True)


def scoring_window(args: argparse.Namespace, log_sha256: str | None) -> int | None:
    """From when prequential scoring may start, given the trained model's holdout.

    A model trained on this very log may only be scored on what it never read: leave-one-out
    needs a ``loo`` model; prequential scores from the model's ``trained_until_ts``.
    """
    if args.model_dir is None:
        return None
    manifest = read_manifest(args.model_dir)
    if manifest["data"]["sha256"] != log_sha256:
        log.warning(
            "model_from_other_data", model=manifest["version"], trained_on=manifest["data"]["path"]
        )
        return None
    kind = manifest["holdout"]["kind"]
    if args.protocol == "loo" and kind != "loo":
        raise UserError(
            f"{args.model_dir} was trained with --holdout {kind}; leave-one-out evaluation on "
            "the same log needs a model trained with --holdout loo"
        )
    if args.protocol == "prequential":
        until = manifest["holdout"]["trained_until_ts"]
        if until is None:
            raise UserError(
                f"{args.model_dir} was trained on every user's early items (--holdout loo); "
                "prequential evaluation on the same log needs a model trained with --holdout time"
            )
        return int(until)
    return None


def sweep_models(
    models: Sequence[EvalModel], lambdas: Sequence[float], k: int
) -> dict[float, Ranker]:
    """The trained model (else the ranker) once more per MMR lambda, sharing its vector store."""
    base = next((m for m in models if isinstance(m, Ranker) and m.name == "trained"), None)
    base = base or next((m for m in models if isinstance(m, Ranker)), None)
    if base is None or not lambdas:
        return {}
    rec = base.recommender
    out = {}
    for lam in lambdas:
        ranking = rec.cfg.model_copy(update={"mmr_lambda": lam, "k": k})
        out[lam] = Ranker(
            rec.store, ranking, rec.fallback, name=f"{base.name}@mmr={lam:g}", model=rec.model
        )
    return out


def cli_eval(args: argparse.Namespace) -> int:
    settings = load_cli_settings(args)
    ks = parse_ks(args.k)
    names = parse_models(args.models)
    lambdas = parse_sweep(args.mmr_sweep)
    if args.model_dir is not None and "trained" not in names:
        names.append("trained")
    if lambdas and not {"ranker", "trained"} & set(names):
        raise UserError("--mmr-sweep needs the ranker or a trained model among --models")
    try:
        data = load_dataset(args.log)
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None
    if not data.interactions:
        raise UserError(f"{args.log} has no interactions to evaluate")
    score_from = scoring_window(args, fingerprint(args.log) if args.model_dir else None)
    with tempfile.TemporaryDirectory(prefix="recstream-eval-") as tmp:
        models = build_models(
            names, data, settings, k=max(ks), workdir=Path(tmp), model_dir=args.model_dir
        )
        sweep = sweep_models(models, lambdas, max(ks))
        models += list(sweep.values())
        if args.protocol == "loo":
            runs, popularity = run_loo(data, models, max(ks), masked=not args.unmasked)
        else:
            runs, popularity = run_prequential(data, models, max(ks), score_from_ts=score_from)
        vectors = None
        if any(isinstance(m, (TextKnn, Ranker)) for m in models):  # diversity needs item vectors
            emb = Embeddings(settings)
            embedded = emb.of([data.item_text[i] for i in data.catalogue], "items")
            described_vectors = described(data, embedded, embed_reviews(data, emb))
            vectors = dict(zip(data.catalogue, described_vectors, strict=True))
        for store in {
            id(m.recommender.store): m.recommender.store for m in models if isinstance(m, Ranker)
        }.values():
            store.close()
    paths = write_results(
        args.out,
        dataset=data.name,
        protocol=args.protocol,
        runs=runs,
        ks=ks,
        catalogue=data.catalogue,
        item_vectors=vectors,
        popularity=popularity,
        settings={
            "masked": not args.unmasked,
            "models": names,
            "ranking": settings.ranking.model_dump(),
            "model_version": next(
                (
                    m.recommender.version
                    for m in models
                    if isinstance(m, Ranker) and m.name == "trained"
                ),
                None,
            ),
            "scored_from_ts": score_from,
        },
        command="recstream " + shlex.join(sys.argv[1:]),
        sweep={m.name: lam for lam, m in sweep.items()} or None,
    )
    print(paths["md"].read_text())
    print(f"wrote {paths['json']}, {paths['md']} and {len(paths['plots'])} plot(s)")
    return 0
