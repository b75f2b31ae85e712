"""The pure core: user state, fusion, co-visitation, ranking, recommender, routing, batching."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pytest

from infra.settings import RankingSettings
from infra.vectors import VectorPoint
from infra.vectors.edge import EdgeVectorStore
from models.covisit import add_counts, bump_popularity, covisit_pairs, covisit_scores
from models.ranking import ItemInfo, RankInput, Weights, mmr_select, rank
from models.recommender import Recommender, UserRequest
from models.state import (
    CONSUMED_KINDS,
    KIND_WEIGHTS,
    Fusion,
    Interaction,
    ReviewRef,
    UserState,
    apply_interaction,
    apply_review,
    behaviour_vector,
    kind_weight,
    text_vector,
)
from schemas.events import (
    BehaviorEvent,
    ForgetUserEvent,
    ItemEvent,
    ItemRemovedEvent,
    RecommendationEvent,
    ReviewEvent,
)
from schemas.internal import EncodeRequest, UserUpdate
from schemas.topics import ENCODE_REQUESTS, RECOMMENDATIONS, USER_UPDATES
from streams.encode import coalesce
from streams.ingest import route
from streams.sinks import Sinks
from streams.user_state import POPULAR_KEY, Tables, UserStateStep, apply_updates

TS = 1_700_000_000_000
DIM = 8


def _unit(vec: np.ndarray | list[float]) -> np.ndarray:
    arr = np.asarray(vec, dtype=np.float32)
    return arr / np.linalg.norm(arr)


def _axis(i: int, dim: int = DIM) -> np.ndarray:
    return np.eye(dim, dtype=np.float32)[i]


# --- state ------------------------------------------------------------------------------------


def test_kind_weights_rank_stronger_signals_higher() -> None:
    """Purchases weigh most, then reviews, carts, clicks and views; unknown kinds weigh 1."""
    assert [kind_weight(k) for k in ("view", "click", "add_to_cart", "review", "purchase")] == [
        1.0,
        2.0,
        3.0,
        4.0,
        5.0,
    ]
    assert kind_weight("teleport") == 1.0
    assert kind_weight("purchase") == KIND_WEIGHTS["purchase"]


@pytest.mark.parametrize(
    ("value", "weight"), [(5.0, 5.0), (4.0, 3.0), (2.5, 0.0), (1.0, 0.0), (0.0, 0.0), (None, 0.0)]
)
def test_rating_weight_is_twice_the_stars_above_two_and_a_half(
    value: float | None, weight: float
) -> None:
    """A rating weighs 2 * (stars - 2.5), never below zero; a missing value counts as neutral."""
    assert kind_weight("rating", value) == weight


def test_apply_interaction_caps_recent_and_returns_earlier_items() -> None:
    """Recent keeps only the newest max_recent interactions; the call returns the ones before."""
    state = UserState()
    for n in range(5):
        before = apply_interaction(state, f"i{n}", "view", TS + n, None, max_recent=3)
    assert before == ["i1", "i2", "i3"]
    assert [i.item_id for i in state.recent] == ["i2", "i3", "i4"]
    assert (state.events, state.last_ts) == (5, TS + 4)


def test_apply_interaction_records_consumed_items_once() -> None:
    """Purchased, reviewed and rated items are consumed (once each); views and carts are not."""
    state = UserState()
    for item, kind in [
        ("a", "view"),
        ("b", "purchase"),
        ("c", "add_to_cart"),
        ("b", "purchase"),
        ("d", "rating"),
        ("e", "review"),
    ]:
        apply_interaction(state, item, kind, TS, 4.0 if kind == "rating" else None, max_recent=50)
    assert state.consumed == ["b", "d", "e"]
    assert {"purchase", "review", "rating"} == CONSUMED_KINDS


def test_apply_interaction_keeps_the_latest_timestamp() -> None:
    """last_ts is the newest event time even when events arrive out of order."""
    state = UserState()
    apply_interaction(state, "a", "view", TS + 10, None, max_recent=5)
    apply_interaction(state, "b", "view", TS, None, max_recent=5)
    assert state.last_ts == TS + 10


def test_exclusions_are_consumed_items_plus_recent_ones_when_asked() -> None:
    """Consumed items are always excluded; recent (seen) ones only with exclude_seen."""
    state = UserState()
    apply_interaction(state, "seen", "view", TS, None, max_recent=5)
    apply_interaction(state, "bought", "purchase", TS, None, max_recent=1)  # pushes "seen" out
    apply_interaction(state, "viewed", "view", TS, None, max_recent=5)
    assert state.exclusions(exclude_seen=False) == {"bought"}
    assert state.exclusions(exclude_seen=True) == {"bought", "viewed"}


def test_state_round_trips_through_a_plain_dict() -> None:
    """to_dict is JSON-serialisable and from_dict rebuilds an equal state; None is a fresh one."""
    state = UserState()
    apply_interaction(state, "a", "rating", TS, 4.0, max_recent=5)
    apply_review(state, "review:e1", "a", "Great book")
    data = json.loads(json.dumps(state.to_dict()))
    assert UserState.from_dict(data) == state
    assert UserState.from_dict(None) == UserState()


def test_apply_review_replaces_same_key_in_place_and_trims_snippet() -> None:
    """A review key is stored once, in its first place (latest snippet wins), a repeat of the
    same announcement changes nothing, and snippets are cut to 60 characters."""
    state = UserState()
    assert apply_review(state, "review:e1", "a", "first")
    assert apply_review(state, "review:e2", "b", "x" * 100)
    assert apply_review(state, "review:e1", "a", "edited")
    assert not apply_review(state, "review:e1", "a", "edited")
    assert [(r.key, r.snippet) for r in state.reviews] == [
        ("review:e1", "edited"),
        ("review:e2", "x" * 60),
    ]


def test_behaviour_vector_is_decayed_weighted_mean() -> None:
    """x equals sum(w_kind * 0.5**(age/half_life) * v) / sum(weights), computed by hand on 3-d."""
    state = UserState(
        recent=[
            Interaction("a", "view", TS, 1.0),
            Interaction("b", "purchase", TS + 1, 5.0),
            Interaction("c", "click", TS + 2, 2.0),
        ]
    )
    vectors = {
        "a": np.array([1.0, 0.0, 0.0]),
        "b": np.array([0.0, 1.0, 0.0]),
        "c": np.array([0.0, 0.0, 1.0]),
    }
    # half-life 1 event: ages 2, 1, 0 -> decay 0.25, 0.5, 1 -> weights 0.25, 2.5, 2.0
    expected = np.array([0.25, 2.5, 2.0]) / 4.75
    got = behaviour_vector(state, vectors, half_life_events=1.0)
    assert got is not None
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_behaviour_vector_skips_unknown_and_zero_weight_items() -> None:
    """Items without a vector or with zero weight (a low rating) do not pull x; none -> None."""
    state = UserState(
        recent=[
            Interaction("a", "view", TS, 1.0),
            Interaction("disliked", "rating", TS + 1, 0.0),
            Interaction("unknown", "view", TS + 2, 1.0),
        ]
    )
    vectors = {"a": np.array([1.0, 2.0, 2.0]), "disliked": np.array([0.0, 0.0, 9.0])}
    got = behaviour_vector(state, vectors, half_life_events=5.0)
    assert got is not None
    np.testing.assert_allclose(got, [1.0, 2.0, 2.0])
    assert behaviour_vector(state, {}, half_life_events=5.0) is None
    assert behaviour_vector(UserState(), vectors, half_life_events=5.0) is None


def test_text_vector_is_mean_of_known_review_vectors() -> None:
    """z is the plain mean of the user's review vectors that the store knows."""
    state = UserState(
        reviews=[ReviewRef("r1", "a", ""), ReviewRef("r2", "b", ""), ReviewRef("r3", "c", "")]
    )
    vectors = {"r1": np.array([1.0, 0.0, 3.0]), "r2": np.array([0.0, 2.0, 1.0])}
    got = text_vector(state, vectors)
    assert got is not None
    np.testing.assert_allclose(got, [0.5, 1.0, 2.0])
    assert text_vector(state, {}) is None


def _query(fusion: Fusion, x: np.ndarray | None, z: np.ndarray | None) -> np.ndarray:
    q = fusion.query(x, z)
    assert q is not None
    return q


def test_untrained_fusion_query_is_normalised_weighted_mean() -> None:
    """Untrained f(x, z) = unit(a*x + (1-a)*z); x alone (or z alone) when the other is missing."""
    x = np.array([3.0, 0.0, 4.0], dtype=np.float32)
    z = np.array([0.0, 2.0, 0.0], dtype=np.float32)
    fusion = Fusion.untrained(behaviour_weight=0.7)
    mixed = 0.7 * x + 0.3 * z
    q = _query(fusion, x, z)
    assert q.dtype == np.float32
    np.testing.assert_allclose(q, mixed / np.linalg.norm(mixed), rtol=1e-6)
    np.testing.assert_allclose(_query(fusion, x, None), np.array([0.6, 0.0, 0.8]), rtol=1e-6)
    np.testing.assert_allclose(_query(fusion, None, z), np.array([0.0, 1.0, 0.0]), rtol=1e-6)
    assert fusion.query(None, None) is None


def test_trained_fusion_applies_its_matrices() -> None:
    """A trained fusion maps x by W1 and z by W2 before summing and normalising."""
    w1 = np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32)  # swaps the axes
    w2 = np.eye(2, dtype=np.float32) * 3.0
    fusion = Fusion(w1, w2, "trained-v1")
    x = np.array([1.0, 0.0], dtype=np.float32)
    z = np.array([1.0, 0.0], dtype=np.float32)
    np.testing.assert_allclose(_query(fusion, x, None), np.array([0.0, 1.0]), atol=1e-7)
    np.testing.assert_allclose(_query(fusion, None, z), np.array([1.0, 0.0]), atol=1e-7)
    both = np.array([3.0, 1.0]) / np.sqrt(10.0)  # x W1 = (0, 1), z W2 = (3, 0)
    np.testing.assert_allclose(_query(fusion, x, z), both, rtol=1e-6)


def test_fusion_save_and_load_round_trip(tmp_path: Path) -> None:
    """A saved fusion loads back with the same matrices and version."""
    fusion = Fusion(np.eye(3, dtype=np.float32) * 2, np.ones((3, 3), np.float32), "v7")
    fusion.save(tmp_path / "fusion.npz")
    back = Fusion.load(tmp_path / "fusion.npz")
    np.testing.assert_array_equal(back.w1, fusion.w1)
    np.testing.assert_array_equal(back.w2, fusion.w2)
    assert back.version == "v7"


# --- co-visitation and popularity -------------------------------------------------------------


def test_covisit_pairs_cover_window_distinct_earlier_items_both_ways() -> None:
    """Pairs link the item with its last `window` distinct earlier items, in both directions."""
    assert covisit_pairs(["a", "b", "c", "d"], "e", window=2) == [
        ("d", "e"),
        ("e", "d"),
        ("c", "e"),
        ("e", "c"),
    ]


def test_covisit_pairs_skip_repeats_and_the_item_itself() -> None:
    """Repeated earlier items count once and earlier views of the same item form no pair."""
    pairs = covisit_pairs(["a", "b", "x", "b", "x", "b"], "x", window=3)
    assert pairs == [("b", "x"), ("x", "b"), ("a", "x"), ("x", "a")]
    assert covisit_pairs([], "x") == []


def test_add_counts_adds_one_per_other_and_trims_to_cap() -> None:
    """Each other gains one count; past 2*cap entries only the cap most counted are kept."""
    counts = add_counts({"a": 2.0}, ["a", "b", "b"], cap=2)
    assert counts == {"a": 3.0, "b": 2.0}
    untrimmed = add_counts(counts, ["c", "d"], cap=2)  # 4 entries = 2*cap: not yet trimmed
    assert untrimmed == {"a": 3.0, "b": 2.0, "c": 1.0, "d": 1.0}
    trimmed = add_counts(untrimmed, ["e", "d"], cap=2)  # 5 entries > 2*cap
    assert trimmed == {"a": 3.0, "b": 2.0}


def test_add_counts_does_not_mutate_its_input() -> None:
    """add_counts returns a new map and leaves the table's value untouched."""
    original = {"a": 1.0}
    add_counts(original, ["a"])
    assert original == {"a": 1.0}


def test_covisit_scores_normalise_per_source_and_name_the_top_source() -> None:
    """Counts are shares of each source's total, summed by weight, scaled so the best is 1."""
    neighbours = {"a": {"x": 3.0, "y": 1.0}, "b": {"x": 1.0, "z": 1.0}, "c": {"w": 5.0}}
    scores, source = covisit_scores(neighbours, [("a", 1.0), ("b", 1.0), ("c", 0.0)])
    # raw: x = 3/4 + 1/2 = 1.25, y = 1/4, z = 1/2; c has weight 0 and is ignored
    assert scores == pytest.approx({"x": 1.0, "y": 0.2, "z": 0.4})
    assert source == {"x": "a", "y": "a", "z": "b"}
    assert covisit_scores(neighbours, [("unknown", 1.0)]) == ({}, {})


def test_covisit_scores_keep_the_best_candidates_up_to_the_limit_and_their_ties() -> None:
    """With a limit, only the best-scored candidates survive (with any tied at the boundary),
    their scores and sources as without the limit, still scaled so the best is 1."""
    neighbours = {
        "a": {"x": 4.0, "y": 2.0, "z": 2.0, "w": 1.0, "v": 1.0},
        "b": {"x": 1.0, "u": 3.0},
    }
    recent = [("a", 1.0), ("b", 1.0)]
    full, full_source = covisit_scores(neighbours, recent)
    two, two_source = covisit_scores(neighbours, recent, limit=2)
    # raw: x = 0.4 + 0.25 = 0.65, u = 0.75, y = z = 0.2, w = v = 0.1
    assert two == pytest.approx({"u": 1.0, "x": 0.65 / 0.75})
    assert two_source == {"u": "b", "x": "a"}
    tied, _ = covisit_scores(neighbours, recent, limit=3)
    assert set(tied) == {"u", "x", "y", "z"}  # y and z tie for third place
    assert {k: full[k] for k in tied} == pytest.approx(tied)
    assert covisit_scores(neighbours, recent, limit=10) == (full, full_source)


def test_bump_popularity_decays_old_counts_per_new_interaction() -> None:
    """Old counts decay by decay**n for n new interactions; each new one by its recency."""
    popular = bump_popularity({"a": 1.0, "c": 4.0}, ["b", "a"], decay=0.5)
    # n = 2: a = 1*0.25 + 0.5**0, c = 4*0.25, b = 0.5**1
    assert popular == pytest.approx({"a": 1.25, "b": 0.5, "c": 1.0})
    assert bump_popularity(None, [], decay=0.5) == {}


def test_bump_popularity_trims_to_cap() -> None:
    """Past 2*cap entries, only the cap most popular survive."""
    popular = bump_popularity({"a": 10.0, "b": 9.0}, ["c", "d", "e"], decay=1.0, cap=2)
    assert popular == {"a": 10.0, "b": 9.0}


# --- ranking ----------------------------------------------------------------------------------


def _items(**vectors: np.ndarray | list[float]) -> dict[str, ItemInfo]:
    return {k: ItemInfo(k, _unit(v), k.upper()) for k, v in vectors.items()}


def test_rank_never_returns_seen_or_unavailable_items() -> None:
    """Excluded (seen, consumed) and unavailable items are filtered even when most similar."""
    items = _items(seen=[1, 0, 0], gone=[1, 0.01, 0], ok=[0.9, 0.4, 0], ok2=[0.5, 0.5, 0.5])
    items["gone"] = ItemInfo("gone", items["gone"].vector, "GONE", available=False)
    inp = RankInput(
        query=_unit([1, 0, 0]),
        history=[Interaction("seen", "view", TS, 1.0)],
        reviews=[],
        exclude={"seen"},
        similar={"seen": 1.0, "gone": 0.99, "ok": 0.9, "ok2": 0.5},
        popular={"gone": 1.0, "seen": 1.0},
    )
    ranked = rank(inp, items, {}, k=10, weights=Weights())
    assert [r.item_id for r in ranked] == ["ok", "ok2"]


def test_every_ranked_item_has_a_reason() -> None:
    """Each ranked item carries at least one reason, popularity being the fallback."""
    items = _items(a=[1, 0, 0], b=[0, 1, 0], c=[0, 0, 1])
    inp = RankInput(
        query=None,
        history=[],
        reviews=[],
        exclude=set(),
        similar={},
        popular={"a": 1.0, "b": 0.5, "c": 0.2},
    )
    ranked = rank(inp, items, {}, k=3, weights=Weights())
    assert [r.item_id for r in ranked] == ["a", "b", "c"]
    assert all(r.reasons == ["popular with other people right now"] for r in ranked)


def test_reason_names_the_nearest_history_item_with_its_strongest_verb() -> None:
    """The first reason quotes the closest history item's title with "bought" for a purchase."""
    items = {
        "dune": ItemInfo("dune", _unit([1, 0, 0]), "Dune"),
        "kettle": ItemInfo("kettle", _unit([0, 1, 0]), "Kettle"),
        "messiah": ItemInfo("messiah", _unit([0.95, 0.05, 0.1]), "Dune Messiah"),
    }
    history = [
        Interaction("dune", "view", TS, 1.0),
        Interaction("kettle", "add_to_cart", TS + 1, 3.0),
        Interaction("dune", "purchase", TS + 2, 5.0),
        Interaction("dune", "view", TS + 3, 1.0),  # a later view does not undo "bought"
    ]
    inp = RankInput(
        query=_unit([1, 0.5, 0]),
        history=history,
        reviews=[],
        exclude={"dune", "kettle"},
        similar={"messiah": 0.9},
    )
    (ranked,) = rank(inp, items, {}, k=5, weights=Weights())
    assert ranked.item_id == "messiah"
    assert ranked.reasons[0] == "because you bought “Dune”"
    assert len(ranked.reasons) <= 2


def test_reason_never_cites_a_disliked_rating() -> None:
    """A 1-star rating (weight 0) is not offered as the reason for a recommendation."""
    items = {
        "bad": ItemInfo("bad", _unit([1, 0, 0]), "Bad Book"),
        "liked": ItemInfo("liked", _unit([0, 1, 0]), "Good Book"),
        "near_bad": ItemInfo("near_bad", _unit([1, 0.2, 0]), "Sequel"),
    }
    history = [
        Interaction("liked", "view", TS, 1.0),
        Interaction("bad", "rating", TS + 1, kind_weight("rating", 1.0)),
    ]
    inp = RankInput(
        query=_unit([0, 1, 0]),
        history=history,
        reviews=[],
        exclude={"bad", "liked"},
        similar={"near_bad": 0.2},
    )
    (ranked,) = rank(inp, items, {}, k=1, weights=Weights())
    assert all("Bad Book" not in reason for reason in ranked.reasons)


def test_reasons_include_review_and_covisitation() -> None:
    """A close review and a co-visitation source each add a reason, strongest first, at most 2."""
    items = {
        "book": ItemInfo("book", _unit([1, 0, 0]), "Book"),
        "lamp": ItemInfo("lamp", _unit([0, 1, 0]), "Lamp"),
    }
    inp = RankInput(
        query=_unit([1, 0, 0]),
        history=[Interaction("lamp", "view", TS, 1.0)],
        reviews=[ReviewRef("review:e1", "book-old", "Loved the prose")],
        exclude={"lamp"},
        similar={"book": 0.8},
        covisit={"book": 1.0},
        covisit_source={"book": "lamp"},
    )
    (ranked,) = rank(inp, items, {"review:e1": _unit([1, 0.1, 0])}, k=1, weights=Weights())
    assert ranked.reasons == [
        "often viewed together with “Lamp”",
        "close to your review of “book-old”: “Loved the prose”",
    ]
    assert ranked.score == pytest.approx(0.8 + 0.35 * 1.0)


def test_mmr_prefers_a_diverse_item_over_a_near_duplicate() -> None:
    """With lambda < 1 the second pick is the distinct item, with lambda = 1 the near-duplicate."""
    items = _items(a=[1, 0, 0], a_copy=[1, 0.05, 0], b=[0, 1, 0])
    scores = {"a": 0.9, "a_copy": 0.89, "b": 0.6}
    assert mmr_select(scores, items, k=2, lam=0.5) == ["a", "b"]
    assert mmr_select(scores, items, k=2, lam=1.0) == ["a", "a_copy"]
    inp = RankInput(query=None, history=[], reviews=[], exclude=set(), similar=scores)
    diverse = rank(inp, items, {}, k=2, weights=Weights(covisit=0.0, mmr_lambda=0.5))
    assert [r.item_id for r in diverse] == ["a", "b"]


def test_rank_respects_k() -> None:
    """rank returns exactly k items when more candidates exist, and all when fewer."""
    rng = np.random.default_rng(3)
    items = {f"i{n}": ItemInfo(f"i{n}", _unit(rng.normal(size=4)), f"I{n}") for n in range(12)}
    similar = {k: float(rng.uniform()) for k in items}
    inp = RankInput(query=None, history=[], reviews=[], exclude=set(), similar=similar)
    top3 = rank(inp, items, {}, k=3, weights=Weights(mmr_lambda=1.0))
    assert [r.item_id for r in top3] == sorted(similar, key=lambda k: -similar[k])[:3]
    assert len(rank(inp, items, {}, k=50, weights=Weights())) == 12
    assert mmr_select({}, items, k=3, lam=0.8) == []


# --- recommender against Qdrant Edge ----------------------------------------------------------

CLUSTER_A = ["a1", "a2", "a3", "a4", "a5"]
CLUSTER_B = ["b1", "b2", "b3", "b4"]


def _cluster_points() -> list[VectorPoint]:
    """Cluster A near axis 0, cluster B near axis 1, each point nudged along its own axis."""
    points = []
    for n, key in enumerate(CLUSTER_A):
        vec = _unit(_axis(0) + 0.1 * _axis(2 + n % 6))
        points.append(VectorPoint(key, vec, {"title": f"Alpha {n}", "available": True}))
    for n, key in enumerate(CLUSTER_B):
        vec = _unit(_axis(1) + 0.1 * _axis(2 + n % 6))
        points.append(VectorPoint(key, vec, {"title": f"Beta {n}", "available": True}))
    points.append(VectorPoint("a_gone", _unit(_axis(0)), {"title": "Gone", "available": False}))
    return points


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EdgeVectorStore]:
    """Qdrant Edge in tmp_path with an 8-d items collection (two clusters) and reviews."""
    vector_store = EdgeVectorStore(tmp_path / "qdrant")
    vector_store.ensure_collection("items", DIM)
    vector_store.ensure_collection("reviews", DIM)
    vector_store.upsert("items", _cluster_points())
    yield vector_store
    vector_store.close()


def _recommender(store: EdgeVectorStore, **ranking: object) -> Recommender:
    cfg = RankingSettings(k=5, **ranking)  # type: ignore[arg-type]
    return Recommender(store, cfg, Fusion.untrained(cfg.behaviour_weight), "items", "reviews")


def _history_state() -> UserState:
    state = UserState()
    apply_interaction(state, "a1", "purchase", TS, None, max_recent=50)
    apply_interaction(state, "a2", "view", TS + 1, None, max_recent=50)
    return state


def test_recommender_ranks_the_users_cluster_first(store: EdgeVectorStore) -> None:
    """A user whose history is in cluster A gets the unseen A items first, then B items."""
    (ranked,) = _recommender(store).recommend([UserRequest("u1", _history_state(), {})])
    ids = [r.item_id for r in ranked]
    assert len(ids) == 5
    assert set(ids[:3]) == {"a3", "a4", "a5"}
    assert set(ids[3:]) <= set(CLUSTER_B)
    assert "a_gone" not in ids
    assert all(r.reasons for r in ranked)
    assert ranked[0].reasons[0].startswith("because you ")
    scores = [r.score for r in ranked]
    assert min(scores[:3]) > max(scores[3:])


def test_recommender_excludes_purchases_even_when_seen_items_are_allowed(
    store: EdgeVectorStore,
) -> None:
    """With exclude_seen off, the viewed item may return but the purchased one never does."""
    (ranked,) = _recommender(store, exclude_seen=False).recommend(
        [UserRequest("u1", _history_state(), {})]
    )
    ids = [r.item_id for r in ranked]
    assert "a1" not in ids
    assert "a2" in ids


def test_recommender_serves_several_users_in_order(store: EdgeVectorStore) -> None:
    """One call gives one list per request, in order; a user with no history gets popular items."""
    b_state = UserState()
    apply_interaction(b_state, "b1", "click", TS, None, max_recent=50)
    lists = _recommender(store).recommend(
        [
            UserRequest("ua", _history_state(), {}),
            UserRequest("ub", b_state, {}),
            UserRequest("new", UserState(), {}),
        ],
        popular={"b4": 2.0, "a5": 1.0},
    )
    assert len(lists) == 3
    assert lists[0][0].item_id in {"a3", "a4", "a5"}
    assert lists[1][0].item_id in {"b2", "b3", "b4"}
    assert [r.item_id for r in lists[2]] == ["b4", "a5"]
    assert _recommender(store).recommend([]) == []


def test_recommender_uses_covisitation_candidates(store: EdgeVectorStore) -> None:
    """A co-visited item from the other cluster is explained by its source item."""
    (ranked,) = _recommender(store).recommend(
        [UserRequest("u1", _history_state(), {"a2": {"b3": 4.0}})]
    )
    by_id = {r.item_id: r for r in ranked}
    assert "b3" in by_id
    assert "often viewed together with “Alpha 1”" in by_id["b3"].reasons


# --- ingest routing and encode batching -------------------------------------------------------


@dataclass
class RecordingTopic:
    """Records what an agent sends (a sink, not a Kafka mock: nothing is consumed back)."""

    sent: list[tuple[bytes, bytes]] = field(default_factory=list)

    def send_soon(self, *, key: bytes, value: bytes, partition: int | None = None) -> None:
        self.sent.append((key, value))


def test_route_behaviour_becomes_one_user_update() -> None:
    """A rating becomes a behaviour user update keyed by user, carrying its value."""
    event = BehaviorEvent(
        event_id="e1", ts=TS, type="rating", user_id="u1", item_id="i1", value=4.0
    )
    (out,) = route(event, received_ms=TS + 3)
    assert (out.spec, out.key) == (USER_UPDATES, "u1")
    update = UserUpdate.model_validate_json(out.value)
    assert update == UserUpdate(
        event_id="e1",
        ts=TS,
        received_ms=TS + 3,
        kind="behavior",
        user_id="u1",
        event_type="rating",
        item_id="i1",
        value=4.0,
    )


def test_route_review_becomes_user_update_and_encode_request() -> None:
    """A review updates the user (keyed by user) and asks for its text's vector (keyed by item)."""
    event = ReviewEvent(
        event_id="e2", ts=TS, type="review", user_id="u1", item_id="i1", text="Superb", rating=5.0
    )
    update_out, request_out = route(event, received_ms=TS)
    assert (update_out.spec, update_out.key) == (USER_UPDATES, "u1")
    assert (request_out.spec, request_out.key) == (ENCODE_REQUESTS, "i1")
    update = UserUpdate.model_validate_json(update_out.value)
    assert (update.kind, update.event_type, update.item_id, update.value) == (
        "behavior",
        "review",
        "i1",
        5.0,
    )
    request = EncodeRequest.model_validate_json(request_out.value)
    assert (request.kind, request.user_id, request.text, request.rating) == (
        "review",
        "u1",
        "Superb",
        5.0,
    )


def test_route_item_becomes_encode_request_with_full_text() -> None:
    """An item upsert asks for its text (title, categories, attributes, description) by item."""
    event = ItemEvent(
        event_id="e3",
        ts=TS,
        type="item",
        item_id="i9",
        title="Dune",
        categories=["books"],
        attributes={"pages": 612},
        description="Sand.",
        available=False,
    )
    (out,) = route(event, received_ms=TS)
    assert (out.spec, out.key) == (ENCODE_REQUESTS, "i9")
    request = EncodeRequest.model_validate_json(out.value)
    assert request.kind == "item"
    assert request.text == "Dune. books. pages: 612. Sand."
    assert (request.title, request.categories, request.available) == ("Dune", ["books"], False)


def test_route_item_removed_and_forget() -> None:
    """Removal is an item_removed encode request by item; forget is a forget update by user."""
    (removed,) = route(
        ItemRemovedEvent(event_id="e4", ts=TS, type="item_removed", item_id="i9"), TS
    )
    assert (removed.spec, removed.key) == (ENCODE_REQUESTS, "i9")
    assert EncodeRequest.model_validate_json(removed.value).kind == "item_removed"
    (forget,) = route(ForgetUserEvent(event_id="e5", ts=TS, type="forget_user", user_id="u7"), TS)
    assert (forget.spec, forget.key) == (USER_UPDATES, "u7")
    update = UserUpdate.model_validate_json(forget.value)
    assert (update.kind, update.user_id, update.item_id) == ("forget", "u7", None)


def _req(
    event_id: str, kind: Literal["item", "review", "item_removed"], item_id: str, text: str = "t"
) -> EncodeRequest:
    return EncodeRequest(
        event_id=event_id, ts=TS, received_ms=TS, kind=kind, item_id=item_id, text=text
    )


def test_coalesce_keeps_latest_per_item_and_every_review() -> None:
    """Per item only the latest request survives (upsert or removal); reviews are all kept."""
    batch = [
        _req("e1", "item", "i1", "old"),
        _req("e2", "review", "i1"),
        _req("e3", "item", "i1", "new"),
        _req("e4", "item_removed", "i2"),
        _req("e5", "review", "i1"),
        _req("e6", "item", "i2", "back"),
        _req("e7", "item", "i3"),
        _req("e8", "item_removed", "i3"),
    ]
    kept = coalesce(batch)
    assert [r.event_id for r in kept] == ["e2", "e3", "e5", "e6", "e8"]
    assert [r.text for r in kept if r.item_id == "i1" and r.kind == "item"] == ["new"]


# --- user-state step --------------------------------------------------------------------------


def _update(
    event_id: str,
    user: str,
    kind: Literal["behavior", "review_embedded", "forget"],
    item: str | None = None,
    event_type: str = "view",
) -> UserUpdate:
    return UserUpdate(
        event_id=event_id,
        ts=TS,
        received_ms=TS,
        kind=kind,
        user_id=user,
        event_type=event_type,
        item_id=item,
    )


def _step(store: EdgeVectorStore, tables: Tables) -> tuple[UserStateStep, RecordingTopic]:
    topic = RecordingTopic()
    step = UserStateStep(
        tables=tables,
        recommender=_recommender(store),
        store=store,
        reviews_collection="reviews",
        sinks=Sinks({RECOMMENDATIONS.name: topic}),
        model_version="test@1",
        max_recent=50,
    )
    return step, topic


def test_apply_updates_applies_in_order_and_forget_resets() -> None:
    """Updates apply in order; a forget clears everything before it, including its pairs."""
    ups = [
        _update("e1", "u", "behavior", "a"),
        _update("e2", "u", "forget", event_type="forget"),
        _update("e3", "u", "behavior", "b"),
        _update("e4", "u", "behavior", "c"),
    ]
    applied = apply_updates(UserState(), ups, max_recent=10)
    assert [i.item_id for i in applied.state.recent] == ["b", "c"]
    assert applied.pairs == [("b", "c"), ("c", "b")]
    assert applied.touched == ["b", "c"]
    assert (applied.changed, applied.repeats) == (True, 0)


def test_user_state_step_applies_each_users_updates_once(store: EdgeVectorStore) -> None:
    """Every update changes its user's state exactly once and feeds covisit and popularity."""
    tables = Tables(users={}, covisit={}, popularity={})
    step, _ = _step(store, tables)
    step.run(
        [
            _update("e1", "u1", "behavior", "a1"),
            _update("e2", "u2", "behavior", "b1"),
            _update("e3", "u1", "behavior", "a2", event_type="purchase"),
        ]
    )
    u1 = UserState.from_dict(tables.users["u1"])
    assert [(i.item_id, i.kind) for i in u1.recent] == [("a1", "view"), ("a2", "purchase")]
    assert (u1.events, u1.consumed) == (2, ["a2"])
    assert UserState.from_dict(tables.users["u2"]).events == 1
    assert tables.covisit == {"a1": {"a2": 1.0}, "a2": {"a1": 1.0}}
    assert set(tables.popularity[POPULAR_KEY]) == {"a1", "a2", "b1"}


def test_user_state_step_emits_one_list_per_user_triggered_by_the_last_update(
    store: EdgeVectorStore,
) -> None:
    """Each user gets one recommendation, keyed by user, whose trigger is their last update."""
    tables = Tables(users={}, covisit={}, popularity={})
    step, topic = _step(store, tables)
    events = step.run(
        [
            _update("e1", "u1", "behavior", "a1"),
            _update("e2", "u2", "behavior", "b1"),
            _update("e3", "u1", "behavior", "a2"),
        ]
    )
    assert [(e.user_id, e.trigger_event_id) for e in events] == [("u1", "e3"), ("u2", "e2")]
    assert [key for key, _ in topic.sent] == [b"u1", b"u2"]
    sent = [RecommendationEvent.model_validate_json(value) for _, value in topic.sent]
    assert sent == events
    assert sent[0].model_version == "test@1"
    assert [i.rank for i in sent[0].items] == list(range(1, len(sent[0].items) + 1))
    assert sent[0].items[0].item_id in {"a3", "a4", "a5"}
    assert {i.item_id for i in sent[0].items}.isdisjoint({"a1", "a2"})


def test_user_state_step_forget_deletes_state_and_emits_nothing(store: EdgeVectorStore) -> None:
    """Forget removes the user's state and stored reviews, and no list is emitted for them."""
    stored = UserState()
    apply_interaction(stored, "a1", "view", TS, None, max_recent=50)
    apply_review(stored, "review:old", "a1", "Nice")
    tables = Tables(users={"u2": stored.to_dict()}, covisit={}, popularity={})
    store.upsert(
        "reviews",
        [
            VectorPoint("review:old", _unit(_axis(0)), {"user_id": "u2", "item_id": "a1"}),
            VectorPoint("review:keep", _unit(_axis(1)), {"user_id": "u1", "item_id": "b1"}),
        ],
    )
    step, topic = _step(store, tables)
    events = step.run(
        [
            _update("e1", "u2", "behavior", "a3"),
            _update("e2", "u1", "behavior", "b2"),
            _update("e3", "u2", "forget", event_type="forget_user"),
        ]
    )
    assert "u2" not in tables.users
    assert [e.user_id for e in events] == ["u1"]
    assert [key for key, _ in topic.sent] == [b"u1"]
    assert sorted(store.retrieve("reviews", ["review:old", "review:keep"])) == ["review:keep"]
    assert set(tables.popularity[POPULAR_KEY]) == {"b2"}  # u2's forgotten batch counts nowhere


def test_a_failing_update_is_dead_lettered_alone_and_the_rest_go_on() -> None:
    """When one update in a batch raises a data error, the others are still applied and only the
    failing one goes to the dead-letter topic, with its original bytes (the inline path; the
    worker's backlog is tested in test_hot_path)."""
    from types import SimpleNamespace

    from streams.user_state import run_or_isolate

    class Flaky:
        """A step whose run fails for batches containing the poisoned user."""

        def __init__(self) -> None:
            self.applied: list[str] = []
            self.sinks = SimpleNamespace(dead=self._dead)
            self.dead: list[tuple[str, bytes]] = []

        def _dead(self, *, stage: str, message, exc: Exception) -> None:
            self.dead.append((stage, message.value))

        def run(self, updates):
            if any(u.user_id == "poison" for u in updates):
                raise ValueError("cannot rank this user")
            self.applied.extend(u.user_id for u in updates)
            return []

    def update(user: str) -> UserUpdate:
        return UserUpdate(
            event_id=f"e-{user}",
            ts=TS,
            received_ms=TS,
            kind="behavior",
            user_id=user,
            event_type="view",
            item_id="i1",
        )

    step = Flaky()
    batch = [(update(u), SimpleNamespace(value=f"raw-{u}".encode())) for u in ("a", "poison", "b")]
    run_or_isolate(step, batch)  # type: ignore[arg-type]
    assert step.applied == ["a", "b"]
    assert step.dead == [("update-user-state", b"raw-poison")]


def test_a_repeat_of_the_latest_item_merges_into_one_interaction() -> None:
    """A review right after buying the same item is one interaction with the stronger kind, and
    co-visitation sees the same predecessors both times."""
    state = UserState()
    apply_interaction(state, "a", "view", TS, None, max_recent=50)
    first = apply_interaction(state, "b", "review", TS + 1, 3.0, max_recent=50)
    again = apply_interaction(state, "b", "purchase", TS + 2, None, max_recent=50)
    assert [(i.item_id, i.kind, i.weight, i.ts) for i in state.recent] == [
        ("a", "view", 1.0, TS),
        ("b", "purchase", 5.0, TS + 2),
    ]
    assert first == again == ["a"]
    assert state.consumed == ["b"]
    assert state.events == 3


def test_a_late_review_vector_refreshes_the_list_under_the_newest_event(
    store: EdgeVectorStore,
) -> None:
    """u reviews a1 (e1), then views a2 (e2); the review's vector arrives after both. The list it
    triggers reflects e2, so it is named after e2, not e1: a reader judging the list shown after
    e1 must not get one that already knows a2."""
    tables = Tables(users={}, covisit={}, popularity={})
    step, _ = _step(store, tables)
    store.upsert(
        "reviews", [VectorPoint("review:e1", _unit(_axis(0)), {"user_id": "u", "item_id": "a1"})]
    )
    first = step.run(
        [
            _update("e1", "u", "behavior", "a1", event_type="review"),
            _update("e2", "u", "behavior", "a2"),
        ]
    )
    late = UserUpdate(
        event_id="e1",
        ts=TS,
        received_ms=TS,
        kind="review_embedded",
        user_id="u",
        event_type="review",
        item_id="a1",
        review_point="review:e1",
        review_snippet="Nice",
    )
    second = step.run([late])
    assert [e.trigger_event_id for e in first] == ["e2"]
    assert [e.trigger_event_id for e in second] == ["e2"]
    assert UserState.from_dict(tables.users["u"]).last_event_id == "e2"
    assert {i.item_id for i in second[0].items}.isdisjoint({"a1", "a2"})
