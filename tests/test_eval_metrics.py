"""Offline-evaluation metrics and the results writer, checked against values computed by hand."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from models.evaluation.metrics import ModelRun, summarize, summarize_slices
from models.evaluation.report import write_results

CATALOGUE = ["a", "b", "c", "d", "e", "f"]
POPULARITY = {"a": 5, "b": 3, "c": 1}  # sum 9; with 6 catalogue items the denominator is 15
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run(name: str = "model", cold_user: list[bool] | None = None) -> ModelRun:
    """Three targets: hit at rank 1, hit at rank 2, and a miss."""
    return ModelRun(
        name=name,
        lists=[["a", "b", "c", "d"], ["b", "c", "a", "d"], ["c", "d", "e", "a"]],
        targets=["a", "c", "b"],
        cold_user=np.array(cold_user if cold_user is not None else [True, False, False]),
        cold_item=np.array([False, False, True]),
        seconds=1.5,
    )


def _minus_log2(count: int) -> float:
    return -math.log2((count + 1) / 15)


def test_accuracy_at_1_and_3() -> None:
    """HR, NDCG and MRR are the means of the per-target scoring rules at each K."""
    got = summarize(_run(), [1, 3], catalogue=CATALOGUE, item_vectors=None, popularity=POPULARITY)
    assert got["targets"] == 3
    assert got["HR@1"] == pytest.approx(1 / 3)
    assert got["NDCG@1"] == pytest.approx(1 / 3)
    assert got["MRR@1"] == pytest.approx(1 / 3)
    assert got["HR@3"] == pytest.approx(2 / 3)
    assert got["NDCG@3"] == pytest.approx((1 + 1 / math.log2(3)) / 3)
    assert got["MRR@3"] == pytest.approx((1 + 1 / 2) / 3)


def test_coverage_counts_distinct_items_in_top_k() -> None:
    """Coverage@K is the number of distinct items in any top-K list over the catalogue size."""
    got = summarize(_run(), [1, 3], catalogue=CATALOGUE, item_vectors=None, popularity=POPULARITY)
    assert got["coverage@1"] == pytest.approx(3 / 6)  # a, b, c
    assert got["coverage@3"] == pytest.approx(5 / 6)  # a, b, c, d, e


def test_novelty_uses_add_one_smoothing() -> None:
    """Novelty@K averages -log2((pop + 1) / (sum(pop) + |catalogue|)) over recommended items."""
    got = summarize(_run(), [1, 3], catalogue=CATALOGUE, item_vectors=None, popularity=POPULARITY)
    at_1 = [_minus_log2(5), _minus_log2(3), _minus_log2(1)]  # a, b, c
    assert got["novelty@1"] == pytest.approx(sum(at_1) / 3)
    # top 3: a b c | b c a | c d e  -> a twice, b twice, c three times, d and e unseen (count 0)
    at_3 = 2 * _minus_log2(5) + 2 * _minus_log2(3) + 3 * _minus_log2(1) + 2 * _minus_log2(0)
    assert got["novelty@3"] == pytest.approx(at_3 / 9)


def test_diversity_from_orthogonal_identical_and_45_degree_vectors() -> None:
    """Diversity@K is the mean over lists of the mean pairwise 1 - cosine, skipping short lists."""
    vectors = {
        "a": np.array([1.0, 0.0]),
        "d": np.array([3.0, 0.0]),  # same direction as a, not unit length
        "b": np.array([0.0, 1.0]),  # orthogonal to a and d
        "c": np.array([1.0, 1.0]),  # 45 degrees from a
    }
    run = ModelRun(
        name="div",
        lists=[["a", "d", "b"], ["a", "d"], ["e", "a"], ["a", "c"]],  # e has no vector
        targets=["f", "f", "f", "f"],
        cold_user=np.zeros(4, dtype=bool),
        cold_item=np.zeros(4, dtype=bool),
    )
    got = summarize(run, [1, 2, 3], catalogue=CATALOGUE, item_vectors=vectors, popularity={})
    # K=3: list 0 pairs (a,d)=0, (a,b)=1, (d,b)=1 -> 2/3; list 1 -> 0; list 2 skipped; list 3 45 deg
    assert got["diversity@3"] == pytest.approx((2 / 3 + 0 + (1 - 1 / math.sqrt(2))) / 3)
    assert got["diversity@2"] == pytest.approx((0 + 0 + (1 - 1 / math.sqrt(2))) / 3)
    assert "diversity@1" not in got  # no list has two vectors in its top 1


def test_diversity_omitted_without_vectors() -> None:
    """Without item vectors there is no diversity key at any K."""
    got = summarize(_run(), [1, 3], catalogue=CATALOGUE, item_vectors=None, popularity=POPULARITY)
    assert not [key for key in got if key.startswith("diversity")]


def test_short_lists_score_what_they_have() -> None:
    """A list shorter than K counts its items only, and an empty list is a miss."""
    run = ModelRun(
        name="short",
        lists=[["b"], []],
        targets=["b", "a"],
        cold_user=np.zeros(2, dtype=bool),
        cold_item=np.zeros(2, dtype=bool),
    )
    got = summarize(run, [3], catalogue=CATALOGUE, item_vectors=None, popularity=POPULARITY)
    assert got["HR@3"] == pytest.approx(0.5)
    assert got["coverage@3"] == pytest.approx(1 / 6)
    assert got["novelty@3"] == pytest.approx(_minus_log2(3))


def test_mismatched_lengths_rejected() -> None:
    """A run whose per-target fields differ in length is rejected when built."""
    with pytest.raises(ValueError, match="differ in length"):
        ModelRun("bad", [["a"]], ["a", "b"], np.array([False]), np.array([False]))


def test_slices_split_targets_by_cold_and_warm() -> None:
    """Each slice summarises exactly its targets: cold/warm users and cold/warm items."""
    got = summarize_slices(
        _run(), [3], catalogue=CATALOGUE, item_vectors=None, popularity=POPULARITY
    )
    assert set(got) == {"all", "cold_users", "cold_items", "warm_users", "warm_items"}
    assert got["all"]["HR@3"] == pytest.approx(2 / 3)
    assert (got["cold_users"]["targets"], got["cold_users"]["HR@3"]) == (1, 1.0)  # rank 1
    assert got["warm_users"]["targets"] == 2
    assert got["warm_users"]["NDCG@3"] == pytest.approx((1 / math.log2(3) + 0) / 2)
    assert (got["cold_items"]["targets"], got["cold_items"]["HR@3"]) == (1, 0.0)  # the miss
    assert got["warm_items"]["MRR@3"] == pytest.approx((1 + 1 / 2) / 2)
    assert got["cold_items"]["coverage@3"] == pytest.approx(3 / 6)  # c, d, e


def test_empty_slice_reports_zero_targets() -> None:
    """A slice with no targets is reported as {"targets": 0} and nothing else."""
    got = summarize_slices(
        _run(cold_user=[False, False, False]),
        [1, 3],
        catalogue=CATALOGUE,
        item_vectors=None,
        popularity=POPULARITY,
    )
    assert got["cold_users"] == {"targets": 0}
    assert got["warm_users"]["targets"] == 3


def test_write_results_writes_json_markdown_and_plots(tmp_path: Path) -> None:
    """write_results writes parseable JSON with NAME@K keys, a 4-decimal table and two PNGs."""
    vectors = {item: np.eye(6)[i] for i, item in enumerate(CATALOGUE)}
    runs = [_run("mostpop"), _run("covisit", cold_user=[False, False, False])]
    out_dir = tmp_path / "nested" / "out"
    paths = write_results(
        out_dir,
        dataset="tiny",
        protocol="loo",
        runs=runs,
        ks=[1, 3],
        catalogue=CATALOGUE,
        item_vectors=vectors,
        popularity=POPULARITY,
        settings={"history": "masked", "data": tmp_path},
        command="recstream eval log.parquet --out out --k 1,3",
    )

    results = json.loads(paths["json"].read_text())
    assert (results["dataset"], results["protocol"], results["ks"]) == ("tiny", "loo", [1, 3])
    assert results["settings"]["history"] == "masked"
    mostpop = results["models"]["mostpop"]
    metric_keys = {key for key in mostpop if key not in {"targets", "seconds"}}
    assert all(
        re.fullmatch(r"(HR|NDCG|MRR|coverage|diversity|novelty)@\d+", k) for k in metric_keys
    )
    assert metric_keys == {
        f"{m}@{k}" for m in ("HR", "NDCG", "MRR", "coverage", "novelty") for k in (1, 3)
    } | {"diversity@3"}
    assert mostpop["HR@3"] == pytest.approx(2 / 3)
    assert mostpop["diversity@3"] == pytest.approx(1.0)  # one-hot vectors, distinct items
    assert (mostpop["targets"], mostpop["seconds"]) == (3, 1.5)
    assert set(results["slices"]["mostpop"]) == {
        "cold_users",
        "cold_items",
        "warm_users",
        "warm_items",
    }
    assert results["slices"]["covisit"]["cold_users"] == {"targets": 0}

    md = paths["md"].read_text()
    assert "mostpop" in md
    assert "covisit" in md
    assert f"{2 / 3:.4f}" in md  # HR@3
    assert f"{(1 + 1 / math.log2(3)) / 3:.4f}" in md  # NDCG@3
    assert "| HR@1 |" in md
    assert "diversity@1" not in md  # undefined at K=1, so no column
    assert "recstream eval log.parquet --out out --k 1,3" in md

    assert [p.name for p in paths["plots"]] == ["metrics_vs_k.png", "slices.png"]
    for plot in paths["plots"]:
        data = plot.read_bytes()
        assert len(data) > 1000
        assert data.startswith(PNG_SIGNATURE)
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "metrics_vs_k.png",
        "results.json",
        "results.md",
        "slices.png",
    ]


def test_write_results_rejects_duplicate_model_names(tmp_path: Path) -> None:
    """Two runs with the same name would overwrite each other, so they are refused."""
    with pytest.raises(ValueError, match="unique"):
        write_results(
            tmp_path,
            dataset="tiny",
            protocol="loo",
            runs=[_run("same"), _run("same")],
            ks=[1],
            catalogue=CATALOGUE,
            item_vectors=None,
            popularity=POPULARITY,
        )


def test_diversity_matches_pairwise_cosines_on_random_lists() -> None:
    """The summed-vector shortcut for diversity equals the explicit mean of pairwise 1 - cosine."""
    rng = np.random.default_rng(7)
    items = [f"i{n}" for n in range(40)]
    vectors = {item: rng.standard_normal(5) for item in items[:30]}  # the last 10 have none
    lists = [[items[j] for j in rng.choice(40, 8, replace=False)] for _ in range(25)]
    run = ModelRun("rand", lists, ["x"] * 25, np.zeros(25, dtype=bool), np.zeros(25, dtype=bool))
    got = summarize(run, [2, 5, 8], catalogue=items, item_vectors=vectors, popularity={})
    for k in (2, 5, 8):
        per_list = []
        for ranked in lists:
            vecs = [vectors[i] / np.linalg.norm(vectors[i]) for i in ranked[:k] if i in vectors]
            pairs = [1 - a @ b for n, a in enumerate(vecs) for b in vecs[n + 1 :]]
            if pairs:
                per_list.append(sum(pairs) / len(pairs))
        assert got[f"diversity@{k}"] == pytest.approx(sum(per_list) / len(per_list))
