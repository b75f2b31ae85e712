"""Training and serving the learned ranker: holdouts, the re-ranker fit, the model directory, the
trained recommender (offline and in the worker), cold start through text, and switching models
without a restart.

The model is trained once per module with the real encoder on a log over the demo catalogue in
which every user walks a category's items in catalogue order (a pattern worth learning).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from clirun import run_cli
from conftest import Stack

from infra.settings import load_settings
from infra.vectors import VectorPoint
from infra.vectors.edge import EdgeVectorStore
from models.evaluation.cli import Embeddings
from models.evaluation.data import load_dataset
from models.ranking import ItemInfo, RankInput, explain, mmr_select
from models.recommender import Recommender, UserRequest
from models.reranker import (
    FEATURES,
    Reranker,
    Signals,
    choose_reranker,
    fit_reranker,
    paired_gain,
)
from models.sequential import SeqConfig, unit_reps
from models.state import UserState, apply_interaction
from models.trained import ModelDirError, TrainedModel, manifest_version, read_manifest
from models.training import Recipe, Trainer, holdout
from producers.demo.data import catalog
from schemas.eventlog import rows_to_frame, to_row
from schemas.events import BehaviorEvent, ItemEvent
from schemas.topics import ENCODE_REQUESTS
from streams.services import Services

T0 = 1_600_000_000_000
DAY = 86_400_000


def _chain_log(path: Path, users: int = 240, length: int = 6, seed: int = 7) -> Path:
    """Item events for the demo catalogue, then users who each buy ``length`` consecutive items of
    one category; the n-th purchases of all users share day n (interleaved in time)."""
    rng = random.Random(seed)
    items = catalog()
    by_cat: dict[str, list[str]] = {}
    for item in items:
        by_cat.setdefault(item["item_id"].rsplit("-", 1)[0], []).append(item["item_id"])
    rows = [to_row(ItemEvent.model_validate({**i, "ts": T0})) for i in items]
    cats = sorted(by_cat)
    for u in range(users):
        chain = by_cat[cats[u % len(cats)]]
        start = rng.randrange(0, len(chain) - length)
        for n, item in enumerate(chain[start : start + length]):
            rows.append(
                to_row(
                    BehaviorEvent(
                        type="purchase",
                        user_id=f"u{u:03d}",
                        item_id=item,
                        ts=T0 + (n + 1) * DAY + u * 1000,
                        event_id=f"u{u:03d}-{n}",
                    )
                )
            )
    rows_to_frame(rows).write_parquet(path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(log, model dir, data dir): one real training run, shared by this module's tests."""
    root = tmp_path_factory.mktemp("training")
    log = _chain_log(root / "log.parquet")
    model_dir = root / "model"
    out = run_cli(
        ["train", str(log), "--out", str(model_dir), "--max-epochs", "3"],
        env={"RECSTREAM_DATA_DIR": str(root / "data"), "RECSTREAM_DEVICE": "cpu"},
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert "validation HR@10" in out.stdout
    return log, model_dir, root / "data"


def test_loo_holdout_never_reads_the_test_item(tmp_path: Path) -> None:
    """LOO: validation target = each user's second-to-last item, history and training = the items
    before it; the last (test) item appears nowhere."""
    data = load_dataset(_chain_log(tmp_path / "log.parquet", users=12, length=4))
    split = holdout(data, "loo")
    last = {u: inters[-1].item_id for u, inters in data.by_user.items()}
    second = {u: inters[-2].item_id for u, inters in data.by_user.items()}
    assert len(split.valid) == 12
    assert split.trained_until_ts is None
    for req, target in split.valid:
        assert target == second[req.user_id]
        assert [s[0].item_id for s in req.history] == [
            i.item_id for i in data.by_user[req.user_id][:2]
        ]
        assert last[req.user_id] not in {s[0].item_id for s in split.train[req.user_id]}
    assert all(len(steps) == 2 for steps in split.train.values())


def test_time_holdout_trains_on_the_past_and_validates_on_the_next_slice(tmp_path: Path) -> None:
    """Time: training steps are before the 80 % cut, validation targets between the cuts, and
    nothing at or after ``trained_until_ts`` is read; the window's steps are kept in order."""
    data = load_dataset(_chain_log(tmp_path / "log.parquet", users=20, length=10))
    split = holdout(data, "time")
    assert split.trained_until_ts is not None
    train_ts = [s[0].ts for steps in split.train.values() for s in steps]
    valid_ts = {req.user_id: len(req.history) for req, _ in split.valid}
    assert max(train_ts) < split.trained_until_ts
    # Day 9 of 10 is the 80 % cut and day 10 the 90 % one: validation = every user's 9th item.
    assert len(split.valid) == 20
    assert set(valid_ts.values()) == {8}
    assert all(len(steps) == 8 for steps in split.train.values())
    # The window's steps in time order, each naming its validation target, for the walk that
    # lets co-visitation learn through the window as the stream does.
    assert [target for _, _, target in split.stream] == list(range(20))
    assert [step[0].item_id for _, step, _ in split.stream] == [t for _, t in split.valid]


def test_reranker_fit_weights_the_signal_that_finds_the_target() -> None:
    """On lists where only ``covisit`` points at the target, the linear fit's largest weight is
    ``covisit``; the default fit (linear term plus network) ranks every target first and names
    ``covisit`` as the signal that lifted it; both survive a round trip through JSON."""
    rng = np.random.default_rng(0)
    lists, targets = [], []
    for n in range(200):
        items = [f"i{n}-{j}" for j in range(20)]
        values = rng.normal(size=(20, len(FEATURES))).astype(np.float32)
        values[:, 2] = rng.uniform(0, 0.5, size=20)
        values[0, 2] = 1.0
        lists.append(Signals(items, values))
        targets.append(items[0])
    linear = fit_reranker(lists, targets, hidden=0)
    assert not linear.net
    assert int(np.argmax(linear.weights)) == FEATURES.index("covisit")
    reranker = fit_reranker(lists, targets)
    assert len(reranker.net) == 5
    for fitted in (linear, reranker):
        assert all(int(np.argmax(fitted.score(s.values))) == 0 for s in lists)
        assert all(fitted.lead_signal(s.values)[0] == "covisit" for s in lists)
        again = Reranker.from_dict(json.loads(json.dumps(fitted.to_dict())))
        np.testing.assert_allclose(
            again.score(lists[0].values), fitted.score(lists[0].values), rtol=1e-5
        )
    with pytest.raises(ValueError, match="signals"):
        Reranker.from_dict({**reranker.to_dict(), "features": ["a"]})


def _trust_lists(n: int) -> tuple[list[Signals], list[str]]:
    """Lists where the sequential score finds the target when the candidates' learned ids saw
    many interactions, and the text-only score finds it when they saw none; the other score
    then points at a decoy (row 1). Even lists are warm, odd ones cold; row 0 is the target."""
    rng = np.random.default_rng(3)
    seq, text, count = (
        FEATURES.index(f) for f in ("sequential", "text_sequential", "trained_count")
    )
    lists, targets = [], []
    for i in range(n):
        items = [f"i{i}-{j}" for j in range(20)]
        values = rng.normal(scale=0.3, size=(20, len(FEATURES))).astype(np.float32)
        warm = i % 2 == 0
        values[:, count] = np.log1p(50.0) if warm else 0.0
        found, decoy = (seq, text) if warm else (text, seq)
        values[0, found] = 2.0
        values[1, decoy] = 2.0
        lists.append(Signals(items, values))
        targets.append(items[0])
    return lists, targets


def test_reranker_network_learns_which_score_to_trust() -> None:
    """On lists where which of two scores finds the target depends on a third signal, no linear
    score can follow both, and the fitted network ranks nearly every target first. Its
    contributions are the fall in score when one signal is set to its mean, and the lead signal
    of a target is the score that found it."""
    lists, targets = _trust_lists(600)

    def first(r: Reranker) -> float:
        return float(np.mean([int(np.argmax(r.score(s.values))) == 0 for s in lists]))

    assert first(fit_reranker(lists, targets, hidden=0)) <= 0.6
    reranker = fit_reranker(lists, targets)
    assert first(reranker) >= 0.95
    warm_lead = reranker.lead_signal(lists[0].values)[0]
    cold_lead = reranker.lead_signal(lists[1].values)[0]
    assert (warm_lead, cold_lead) == ("sequential", "text_sequential")
    seq = FEATURES.index("sequential")
    values = lists[0].values
    mean_seq = values.copy()
    mean_seq[:, seq] = reranker.mean[seq]
    np.testing.assert_allclose(
        reranker.contributions(values)[:, seq],
        reranker.score(values) - reranker.score(mean_seq),
        rtol=1e-4,
        atol=1e-5,
    )


def test_training_chooses_the_reranker_by_cross_validation() -> None:
    """Held-out folds decide between the linear re-ranker and the network: on the lists above
    the network ranks far more held-out targets first (both have nearly all in the top 10), so
    its NDCG@10 gain is many standard errors and it is chosen and fitted on every list; lists
    whose target is not among the candidates count as misses."""
    lists, targets = _trust_lists(400)
    lists.append(Signals(["x", "y"], np.zeros((2, len(FEATURES)), np.float32)))
    targets.append("absent")
    reranker, report = choose_reranker(lists, targets)
    assert report["chosen"] == "network"
    assert len(reranker.net) == 5
    linear, network = report["linear"], report["network"]
    assert isinstance(linear, dict)
    assert isinstance(network, dict)
    assert network["HR@10"] == round(400 / 401, 4)  # the absent target is the one miss
    assert network["NDCG@10"] > linear["NDCG@10"] + 0.1
    gain, error = report["network_NDCG@10_gain"], report["gain_standard_error"]
    assert isinstance(gain, float)
    assert isinstance(error, float)
    assert gain == pytest.approx(network["NDCG@10"] - linear["NDCG@10"], abs=2e-4)
    assert 0 < error < gain / 5  # the network lifts the targets within the top 10


def test_the_network_must_beat_the_linear_reranker_by_more_than_its_noise() -> None:
    """Where the linear re-ranker already ranks every target first (only ``covisit`` points at
    it), the network cannot gain, and the linear re-ranker is kept; the paired gain and its
    standard error are those of the per-list differences."""
    rng = np.random.default_rng(1)
    lists, targets = [], []
    for n in range(100):
        items = [f"i{n}-{j}" for j in range(20)]
        values = rng.normal(size=(20, len(FEATURES))).astype(np.float32)
        values[0, FEATURES.index("covisit")] = 4.0
        lists.append(Signals(items, values))
        targets.append(items[0])
    reranker, report = choose_reranker(lists, targets)
    assert report["chosen"] == "linear"
    assert not reranker.net
    assert report["linear"] == {"HR@10": 1.0, "NDCG@10": 1.0}
    assert report["network_NDCG@10_gain"] == 0.0
    gain, error = paired_gain(np.array([1, 1, 0, 1]), np.array([0, 1, 0, 0]))
    assert gain == 0.5
    assert error == pytest.approx(np.sqrt(1 / 3) / 2)  # the differences' spread over sqrt(4)


def test_mmr_is_independent_of_the_score_scale() -> None:
    """MMR works on relevance rescaled to [0, 1]: multiplying every score by 50 changes nothing."""
    rng = np.random.default_rng(1)
    vecs = rng.normal(size=(30, 8))
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    items = {f"i{n}": ItemInfo(f"i{n}", v, f"t{n}") for n, v in enumerate(vecs)}
    scores = {f"i{n}": float(rng.uniform()) for n in range(30)}
    scaled = {k: 50 * v for k, v in scores.items()}
    assert mmr_select(scores, items, 10, 0.6) == mmr_select(scaled, items, 10, 0.6)


def _mmr_reference(scores: dict[str, float], items: dict[str, ItemInfo], k: int, lam: float):
    """MMR written out plainly: sort everything, then pick one item at a time."""
    pool = sorted(scores, key=lambda i: (-scores[i], i))[: 4 * k]
    rel = np.array([scores[i] for i in pool])
    spread = rel.max() - rel.min()
    rel = (rel - rel.min()) / spread if spread > 0 else np.ones_like(rel)
    chosen: list[int] = []
    while len(chosen) < min(k, len(pool)):
        best, best_value = -1, -np.inf
        for n, item in enumerate(pool):
            if n in chosen:
                continue
            near = max(
                (float(items[item].vector @ items[pool[c]].vector) for c in chosen), default=0.0
            )
            value = lam * rel[n] - (1 - lam) * near
            if value > best_value:
                best, best_value = n, value
        chosen.append(best)
    return [pool[c] for c in chosen]


def test_mmr_matches_a_plain_reference_with_ties() -> None:
    """The fast MMR (a partial sort for the pool, one product per pick) picks exactly what the
    plain definition picks, on catalogues smaller and larger than the pool and with many tied
    scores (ties go to the smaller item id), at lambda 1.0, 0.8 and 0.5."""
    rng = np.random.default_rng(7)
    for trial in range(60):
        n = int(rng.integers(1, 300))
        vecs = rng.normal(size=(n, 16))
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        items = {f"i{j:03d}": ItemInfo(f"i{j:03d}", v, "t") for j, v in enumerate(vecs)}
        digits = 1 if trial % 2 else 9  # one decimal: most scores tie with others
        order = rng.permutation(list(items))  # insertion order is not id order
        scores = {str(i): round(float(rng.uniform()), digits) for i in order}
        for lam in (1.0, 0.8, 0.5):
            assert mmr_select(scores, items, 10, lam) == _mmr_reference(scores, items, 10, lam)


def test_lead_signal_puts_its_reason_first() -> None:
    """When the re-ranker says co-visitation lifted an item most, its reason leads even though the
    history item is textually closer."""
    a, b = np.array([1.0, 0.0]), np.array([0.9, 0.436])
    items = {
        "h": ItemInfo("h", a, "Hist"),
        "c": ItemInfo("c", b, "Cand"),
        "s": ItemInfo("s", a, "Src"),
    }
    state = UserState()
    apply_interaction(state, "h", "view", T0, None, max_recent=10)
    inp = RankInput(None, state.recent, [], set(), {}, {"c": 0.1}, {"c": "s"})
    assert explain(items["c"], inp, items, {})[0].startswith("because you viewed")
    inp.lead = {"c": "covisit"}
    assert explain(items["c"], inp, items, {})[0] == "often viewed together with “Src”"
    inp.lead = {"c": "popular"}
    assert explain(items["c"], inp, items, {})[0] == "popular with other people right now"


def test_train_writes_a_complete_model_directory(trained: tuple[Path, Path, Path]) -> None:
    """The manifest names the version, the log's sha256 and counts, the settings and validation
    metrics; the model loads and its version is the manifest's."""
    _log, model_dir, _ = trained
    manifest = read_manifest(model_dir)
    assert manifest["data"]["interactions"] == 240 * 6
    assert manifest["data"]["items"] == 240
    assert len(manifest["data"]["sha256"]) == 64
    assert manifest["holdout"] == {
        "kind": "loo",
        "validation_targets": 240,
        "trained_until_ts": None,
    }
    assert manifest["settings"]["sequential"] == SeqConfig().to_dict()
    dim = SeqConfig().dim
    members = manifest["training"]["members"]
    assert [m["seed"] for m in members] == [0, 1]  # an ensemble of two sequential models
    assert all([e["epoch"] for e in m["epochs"]] == [1, 2, 3] for m in members)
    for part in ("sequential", "recommender"):
        assert (
            0.0
            <= manifest["validation"][part]["NDCG@10"]
            <= manifest["validation"][part]["HR@10"]
            <= 1.0
        )
    model = TrainedModel.load(model_dir)
    assert model.version == manifest["version"] == manifest_version(model_dir)
    assert len(model.vocab) == model.item_reps.shape[0]
    assert model.item_reps.shape[1] == 2 * dim
    assert len(model.seqs) == 2
    assert model.reranker.to_dict() == manifest["reranker"]


def test_trained_model_learns_the_walk(trained: tuple[Path, Path, Path]) -> None:
    """Every user walks a category in catalogue order; on the validation targets the trained
    recommender puts the next item in the top 10 for most users (popularity alone cannot: the
    240 users spread over 240 items)."""
    _, model_dir, _ = trained
    valid = read_manifest(model_dir)["validation"]["recommender"]
    assert valid["HR@10"] >= 0.6, valid


def test_eval_with_model_dir_reports_the_trained_model(
    trained: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """``eval --model-dir`` ranks with the trained model beside the baselines in the same run, and
    beats MostPop on the test items."""
    log, model_dir, data_dir = trained
    out = run_cli(
        [
            "eval",
            str(log),
            "--out",
            str(tmp_path / "ev"),
            "--models",
            "mostpop,covisit",
            "--model-dir",
            str(model_dir),
            "--k",
            "10",
        ],
        env={"RECSTREAM_DATA_DIR": str(data_dir), "RECSTREAM_DEVICE": "cpu"},
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    models = results["models"]
    assert set(models) == {"mostpop", "covisit", "trained"}
    assert models["trained"]["HR@10"] > models["mostpop"]["HR@10"] + 0.3


def test_item_scores_are_the_members_cosines(trained: tuple[Path, Path, Path]) -> None:
    """A trained model's two sequential scores for a candidate are the ensemble's mean cosine
    between the user and the item's full representation, and with its text part alone (the
    padding id, as for an item the model never saw), and the training counts follow the
    vocabulary; an item outside it counts 0."""
    _, model_dir, _ = trained
    model = TrainedModel.load(model_dir)
    rng = np.random.default_rng(5)
    items = [*model.vocab[:6], "never-seen"]
    history = model.vocab[6:9]
    vecs = {}
    for i in [*items, *history]:
        v = rng.normal(size=384).astype(np.float32)
        vecs[i] = v / np.linalg.norm(v)  # unit length, as the encoder's vectors are
    user = model.user_vectors([history], vecs)[0]
    full, text_only = model.item_scores(user, items, vecs)
    text = torch.tensor(np.stack([vecs[i] for i in items]))
    ids = torch.tensor([model.index.get(i, len(model.vocab)) for i in items])
    with torch.inference_mode():
        want_full = unit_reps(model.seqs, text, ids).numpy() @ user
        want_text = (
            unit_reps(model.seqs, text, torch.full_like(ids, len(model.vocab))).numpy() @ user
        )
    np.testing.assert_allclose(full, want_full, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(text_only, want_text, rtol=1e-5, atol=1e-6)
    assert full[-1] == pytest.approx(text_only[-1])  # no learned id: both are the text part
    # the text query's dot product with a text vector is the members' text parts' dot products
    # with the user, up to one constant for every item (the standardising mean's share)
    query = model.text_queries(user[None])[0]
    dim = model.seqs[0].cfg.dim
    with torch.inference_mode():
        parts = sum(
            seq.text_part(text).numpy() @ user[m * dim : (m + 1) * dim]
            for m, seq in enumerate(model.seqs)
        )
    gap = np.stack([vecs[i] for i in items]) @ query - parts
    np.testing.assert_allclose(gap, gap[0], atol=1e-3 * np.abs(parts).max())
    counts = model.trained_counts(items)
    assert counts[-1] == 0.0
    assert counts[:-1].tolist() == [model.counts[model.index[i]] for i in items[:-1]]
    assert (counts[:-1] > 0).all()


def test_a_new_item_ranks_by_its_text(trained: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """An item added after training (no learned id) is retrieved through its text and ranked by
    it: a near-copy of a catalogue item's text ranks no more than three places below that item,
    and both are in the user's top 30 (without co-visitation or popularity, text decides). It
    may rank above its twin: the training-count signal weighs what validation taught about items
    the training part saw less (in this log, a walk's later items, which are the targets)."""
    _, model_dir, data_dir = trained
    model = TrainedModel.load(model_dir)
    settings = load_settings(data_dir=data_dir, encoder={"device": "cpu"})
    items = catalog()
    emb = Embeddings(settings)
    text = {i["item_id"]: ItemEvent.model_validate(i).text() for i in items}
    ids = list(text)
    vecs = emb.of([text[i] for i in ids], "items")
    new_vec = emb.of([text["scifi-006"] + " Special edition."], "new")[0]
    store = EdgeVectorStore(tmp_path / "store")
    store.ensure_collection("items", vecs.shape[1])
    store.ensure_collection("reviews", vecs.shape[1])
    points = [
        VectorPoint(i, v, {"title": i, "available": True}) for i, v in zip(ids, vecs, strict=True)
    ]
    points.append(
        VectorPoint("scifi-006-special", new_vec, {"title": "special", "available": True})
    )
    store.upsert("items", points)
    try:
        ranking = settings.ranking.model_copy(update={"mmr_lambda": 1.0, "k": 30})
        rec = Recommender(store, ranking, model.fusion, "items", "reviews", model=model)
        state = UserState()
        for n, item in enumerate(["scifi-003", "scifi-004", "scifi-005"]):
            apply_interaction(state, item, "purchase", T0 + n, None, max_recent=50)
        req = UserRequest("x", state, {})
        (signals,) = rec.gather([req]).signals or []
        assert "scifi-006-special" not in model.index
        scores = dict(zip(signals.items, model.reranker.score(signals.values), strict=True))
        order = sorted(scores, key=lambda i: -scores[i])
        new, twin = order.index("scifi-006-special"), order.index("scifi-006")
        assert new <= twin + 3, (new, twin, len(order))
        (ranked,) = rec.recommend([req])
        shown = [r.item_id for r in ranked]
        assert "scifi-006-special" in shown
        assert "scifi-006" in shown
        assert all(r.reasons for r in ranked)
    finally:
        store.close()


def test_bad_model_dir_is_one_clear_line(tmp_path: Path) -> None:
    """Loading a directory that is not a model says so; the CLI prints one line and exits 2."""
    with pytest.raises(ModelDirError, match="not a model directory"):
        TrainedModel.load(tmp_path)
    out = run_cli(
        [
            "eval",
            str(tmp_path / "x.parquet"),
            "--out",
            str(tmp_path / "o"),
            "--model-dir",
            str(tmp_path),
        ]
    )
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    out = run_cli(["train", str(tmp_path / "missing.parquet"), "--out", str(tmp_path / "m")])
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_services_switch_only_to_a_new_complete_version(
    trained: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """The watcher loads a model only when the manifest's version changed, and keeps the served
    one when the directory holds no readable manifest."""
    _, model_dir, _data_dir = trained
    served = tmp_path / "served"
    shutil.copytree(model_dir, served)
    settings = load_settings(
        data_dir=tmp_path / "d", serving={"model_dir": served}, encoder={"device": "cpu"}
    )
    services = Services(settings)
    try:
        first = services.recommender().model
        assert first is not None
        assert services.changed_model() is None
        manifest = json.loads((served / "manifest.json").read_text())
        (served / "manifest.json").write_text(json.dumps({**manifest, "version": "v-next"}))
        switched = services.changed_model()
        assert switched is not None
        assert switched.version == "v-next"
        services.recommender().model = switched
        assert services.model_version().startswith("v-next+")
        (served / "manifest.json").unlink()
        assert services.changed_model() is None
    finally:
        services.close()


@pytest.mark.stack
def test_worker_serves_the_trained_model_and_switches_without_restart(
    trained: tuple[Path, Path, Path], settings, tmp_path: Path
) -> None:
    """A worker started with a model directory names its version in every recommendation; after a
    new model is written to the watched path, later recommendations name the new version while
    the same worker process keeps running."""
    _, model_dir, _ = trained
    served = tmp_path / "served"
    shutil.copytree(model_dir, served)
    version = read_manifest(served)["version"]
    stack = Stack(
        settings,
        tmp_path,
        RECSTREAM_SERVING__MODEL_DIR=str(served),
        RECSTREAM_SERVING__WATCH_S="0.5",
    )
    try:
        items = catalog()
        stack.publish(*items)
        stack.wait_committed(ENCODE_REQUESTS.name, len(items))
        stack.publish(
            *[
                {
                    "type": "purchase",
                    "user_id": "w",
                    "item_id": f"garden-00{n}",
                    "event_id": f"w-{n}",
                }
                for n in (1, 2, 3)
            ]
        )
        first = stack.wait_for(lambda r: r.get("trigger_event_id") == "w-3", "first list")
        assert first["model_version"].startswith(version + "+")
        assert all(i["reasons"] for i in first["items"])
        pid = stack.proc.pid
        manifest = json.loads((served / "manifest.json").read_text())
        (served / "manifest.json").write_text(json.dumps({**manifest, "version": "v-next"}))
        deadline = time.monotonic() + 60
        n = 4
        while True:
            stack.publish(
                {"type": "view", "user_id": "w", "item_id": "garden-005", "event_id": f"w-{n}"}
            )
            rec = stack.wait_for(lambda r, n=n: r.get("trigger_event_id") == f"w-{n}", "a list")
            if rec["model_version"].startswith("v-next+") or time.monotonic() > deadline:
                break
            n += 1
            time.sleep(0.5)
        assert rec["model_version"].startswith("v-next+")
        assert stack.proc.pid == pid
        assert stack.proc.poll() is None
    finally:
        stack.stop()


def _eval(log: Path, out: Path, data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(
        ["eval", str(log), "--out", str(out), "--k", "10", *args],
        env={"RECSTREAM_DATA_DIR": str(data_dir), "RECSTREAM_DEVICE": "cpu"},
        timeout=600,
    )


def test_mmr_sweep_trades_accuracy_for_diversity(
    trained: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """``--mmr-sweep`` ranks with the trained model once per lambda in the same run: a stronger
    diversity push (lower lambda) gives more diverse lists, and the trade-off plot is written."""
    log, model_dir, data_dir = trained
    out = _eval(
        log,
        tmp_path / "ev",
        data_dir,
        "--models",
        "mostpop",
        "--model-dir",
        str(model_dir),
        "--mmr-sweep",
        "1.0,0.3",
    )
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert results["mmr_sweep"] == {"trained@mmr=1": 1.0, "trained@mmr=0.3": 0.3}
    models = results["models"]
    assert models["trained@mmr=0.3"]["diversity@10"] > models["trained@mmr=1"]["diversity@10"]
    assert (tmp_path / "ev" / "tradeoff.png").stat().st_size > 0
    bad = _eval(log, tmp_path / "x", data_dir, "--mmr-sweep", "2", "--models", "mostpop")
    assert bad.returncode == 1
    assert "--mmr-sweep" in bad.stderr


def test_prequential_scores_only_what_a_time_model_never_read(
    trained: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """A model trained with ``--holdout loo`` is refused for prequential evaluation of its own
    log; one trained with ``--holdout time`` is scored only on events from its
    ``trained_until_ts`` on, every model on the same targets."""
    log, loo_dir, data_dir = trained
    refused = _eval(
        log, tmp_path / "r", data_dir, "--protocol", "prequential", "--model-dir", str(loo_dir)
    )
    assert refused.returncode == 1
    assert "--holdout time" in refused.stderr
    time_dir = tmp_path / "time-model"
    out = run_cli(
        ["train", str(log), "--out", str(time_dir), "--holdout", "time", "--max-epochs", "2"],
        env={"RECSTREAM_DATA_DIR": str(data_dir), "RECSTREAM_DEVICE": "cpu"},
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    until = read_manifest(time_dir)["holdout"]["trained_until_ts"]
    assert until == T0 + 6 * DAY + 96_000  # the 1,296th of 1,440 purchase times (90 %)
    out = _eval(
        log,
        tmp_path / "p",
        data_dir,
        "--protocol",
        "prequential",
        "--models",
        "covisit",
        "--model-dir",
        str(time_dir),
    )
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "p" / "results.json").read_text())
    assert results["settings"]["scored_from_ts"] == until
    scored = sum(1 for u in range(240) if T0 + 6 * DAY + u * 1000 >= until)
    assert (
        results["models"]["trained"]["targets"] == results["models"]["covisit"]["targets"] == scored
    )


def test_textless_items_train_on_the_profile_of_training_reviews_only(tmp_path: Path) -> None:
    """With the real encoder and a time holdout: an ASIN-only item's training vector is the unit
    mean of the reviews in the training part; the review written after the cut is left out, and
    an item with catalogue text keeps its text's vector although it was reviewed."""
    from schemas.events import ReviewEvent

    texts = [
        "Warm tone, the strings stay in tune",
        "Bright sound and easy on the fingers",
        "Good strings for the price",
        "Long lasting coated strings",
        "Nice for fingerstyle playing",
        "They squeak a little but sound fine",
        "My favourite strings so far",
        "Solid set of acoustic strings",
        "Arrived late",
        "The drum throne wobbles and the seat cracked",
    ]
    rows = [
        to_row(
            ItemEvent(event_id="i1", ts=T0, type="item", item_id="B00ASIN001", title="B00ASIN001")
        ),
        to_row(
            ItemEvent(event_id="i2", ts=T0, type="item", item_id="tuner", title="Clip-on tuner")
        ),
    ]
    for n, text in enumerate(texts):
        user, ts = f"u{n}", T0 + (n + 1) * DAY
        for item in ("B00ASIN001", "tuner"):
            common = {"ts": ts, "user_id": user, "item_id": item}
            rows.append(to_row(BehaviorEvent(type="purchase", event_id=f"p{n}{item}", **common)))
            rows.append(
                to_row(ReviewEvent(type="review", event_id=f"r{n}{item}", text=text, **common))
            )
    log = tmp_path / "log.parquet"
    rows_to_frame(rows).write_parquet(log)
    data = load_dataset(log)
    split = holdout(data, "time")
    settings = load_settings(data_dir=tmp_path / "data", encoder={"device": "cpu"})
    trainer = Trainer(data, split, settings, Recipe())
    trained_on = {i.event_id for steps in split.train.values() for s in steps for i in s}
    kept = [t for n, t in enumerate(texts) if f"r{n}B00ASIN001" in trained_on]
    assert 0 < len(kept) < len(texts)
    assert texts[-1] not in kept
    encoded = Embeddings(settings).of(kept, "check")
    mean = encoded.mean(axis=0)
    np.testing.assert_allclose(trainer.vec_of["B00ASIN001"], mean / np.linalg.norm(mean), atol=1e-5)
    tuner = Embeddings(settings).of([data.item_text["tuner"]], "check-tuner")[0]
    np.testing.assert_allclose(trainer.vec_of["tuner"], tuner, atol=1e-5)


def test_early_stopping_outlasts_the_plateaus_seen_on_validation() -> None:
    """A member stops once validation NDCG@10 has not improved for ``patience`` epochs (8): not
    at the plateaus where patience 4 stopped members (epoch 13 after a best at 9, epoch 23 after
    a best at 19), but 8 epochs after its best, and never before."""
    recipe = Recipe()
    assert recipe.patience == 8
    assert Recipe(patience=4).stops(13, 9)
    assert not recipe.stops(13, 9)
    assert not recipe.stops(23, 19)
    assert not recipe.stops(27, 20)
    assert recipe.stops(28, 20)
    assert not recipe.stops(40, 40)
