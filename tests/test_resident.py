"""The resident item index answers candidate queries exactly as the store does, and stays so
through writes made through the cache, notices of writes made elsewhere, reloads, growth past
its limit and concurrent marking; with it the ranker's lists are the same."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from qdrant_client import QdrantClient

from infra.settings import RankingSettings, Settings
from infra.vectors import Filter, VectorPoint, VectorStore
from infra.vectors.cached import CachedStore
from infra.vectors.edge import EdgeVectorStore
from infra.vectors.resident import ResidentIndex
from infra.vectors.server import QdrantServerStore
from models.recommender import Recommender, UserRequest
from models.state import Fusion, Interaction, ReviewRef, UserState
from streams.services import Services

pytestmark = pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning")

DIM = 24
AVAILABLE = Filter(must_equal={"available": True})


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _points(n: int, seed: int = 5, prefix: str = "i") -> list[VectorPoint]:
    """``n`` items; every seventh unavailable, every eleventh with no ``available`` field."""
    vecs = _unit(np.random.default_rng(seed), n)
    out = []
    for k in range(n):
        payload: dict[str, object] = {"title": f"Item {k}"}
        if k % 11:
            payload["available"] = k % 7 != 0
        out.append(VectorPoint(f"{prefix}{k}", vecs[k], payload))
    return out


def _queries(n: int, seed: int = 9) -> list[np.ndarray]:
    """Not unit length: the index must normalise queries as cosine does."""
    return list(2.5 * _unit(np.random.default_rng(seed), n))


@pytest.fixture(params=["edge", "server-local"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VectorStore]:
    """An ``items`` collection of 300 points on each backend in turn."""
    if request.param == "edge":
        store: VectorStore = EdgeVectorStore(tmp_path / "qdrant")
    else:
        store = QdrantServerStore(QdrantClient(location=":memory:"))
    store.ensure_collection("items", DIM)
    store.upsert("items", _points(300))
    yield store
    store.close()


def _assert_same(got: list[dict[str, float]], want: list[dict[str, float]]) -> None:
    """Same scores rank by rank, and the same key at each rank except where scores tie to
    within float32 rounding (the backends differ in precision, so near-ties may swap)."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert len(g) == len(w)
        np.testing.assert_allclose(list(g.values()), list(w.values()), atol=1e-5)
        for (gk, gs), (wk, ws) in zip(g.items(), w.items(), strict=True):
            if gk != wk:  # a swap between near-equal scores
                assert abs(g.get(wk, -9.0) - ws) < 1e-5 or abs(gs - min(w.values())) < 1e-5


def _check(cache: CachedStore, backend: VectorStore, limits: list[int]) -> list[dict[str, float]]:
    """The cache's answer (from the index) equals the backend's, query by query; returned."""
    queries = _queries(len(limits))
    got = cache.query_keys("items", queries, limits, AVAILABLE)
    _assert_same(got, backend.query_keys("items", queries, limits, AVAILABLE))
    return got


def test_index_answers_as_the_store_does(backend: VectorStore) -> None:
    """Keys, order and scores of the index's answers equal the backend's for limits from 1 to
    more than the available points (all of them, best first); unavailable points and points
    without the field are never returned; the backend was not asked."""
    cache = CachedStore(backend, "items", resident_max=1000)
    got = _check(cache, backend, [1, 10, 100, 500])
    held = _points(300)
    available = {p.key for p in held if p.payload.get("available") is True}
    assert set(got[3]) == available
    assert len(got[3]) == len(available) == 233
    assert cache.resident is not None
    assert cache.resident.active
    assert len(cache.resident) == 233


def test_writes_through_the_cache_and_announced_writes_reach_the_index(
    backend: VectorStore,
) -> None:
    """A new item, a moved vector, an item made unavailable and a deleted item written through
    the cache are in the next answer; a write made around the cache is not, until it is
    announced (invalidate) or the cache is cleared; every answer then equals the backend's."""
    cache = CachedStore(backend, "items", resident_max=1000)
    query = _queries(1)[0]
    _check(cache, backend, [20])
    best = next(iter(cache.query_keys("items", [query], 5, AVAILABLE)[0]))
    cache.upsert("items", [VectorPoint("new", query / 2.5, {"available": True})])
    cache.upsert("items", [VectorPoint(best, _unit(np.random.default_rng(1), 1)[0], {})])
    cache.delete("items", ["i1", "i2"])
    first = cache.query_keys("items", [query], 5, AVAILABLE)[0]
    assert next(iter(first)) == "new"
    assert first["new"] == pytest.approx(1.0, abs=1e-5)
    assert best not in cache.query_keys("items", [query], 300, AVAILABLE)[0]
    _check(cache, backend, [300, 7])

    other = _queries(2, seed=12)[1]
    backend.upsert("items", [VectorPoint("elsewhere", other, {"available": True})])
    assert "elsewhere" not in cache.query_keys("items", [other], 5, AVAILABLE)[0]
    cache.invalidate(["elsewhere"])
    assert next(iter(cache.query_keys("items", [other], 5, AVAILABLE)[0])) == "elsewhere"

    backend.delete("items", ["elsewhere", "new"])
    backend.upsert("items", [VectorPoint("quiet", -other, {"available": True})])
    assert "elsewhere" in cache.query_keys("items", [other], 5, AVAILABLE)[0]
    cache.clear()
    assert list(cache.query_keys("items", [-other], 1, AVAILABLE)[0]) == ["quiet"]
    assert "elsewhere" not in cache.query_keys("items", [other], 5, AVAILABLE)[0]
    _check(cache, backend, [300, 3])


def test_index_switches_off_past_its_limit_and_the_store_answers(backend: VectorStore) -> None:
    """With more available points than ``resident_max``, the index holds nothing and the
    backend answers (the same answers); after deletes bring the count back under the limit,
    a clear loads the index again and it answers alone."""
    cache = CachedStore(backend, "items", resident_max=200)
    index = cache.resident
    assert index is not None
    _check(cache, backend, [50])
    assert not index.active
    assert len(index) == 0
    cache.delete("items", [f"i{k}" for k in range(100)])
    cache.clear()
    _check(cache, backend, [50, 300])
    assert index.active
    assert len(index) == 156

    cache.upsert("items", _points(60, seed=8, prefix="more"))
    _check(cache, backend, [300])
    assert not index.active  # 156 + 47 available > 200


def test_many_deletes_compact_the_matrix_and_keep_the_answers(tmp_path: Path) -> None:
    """Deleting most of 3,000 items frees their rows (the matrix shrinks) and the answers stay
    equal to the backend's, before and after new items take rows again."""
    backend = EdgeVectorStore(tmp_path / "qdrant")
    backend.ensure_collection("items", DIM)
    points = [VectorPoint(p.key, p.vector, {"available": True}) for p in _points(3000)]
    backend.upsert("items", points)
    cache = CachedStore(backend, "items", resident_max=10_000)
    _check(cache, backend, [40])
    index = cache.resident
    assert index is not None
    rows_before = index._mat.shape[0]
    cache.delete("items", [p.key for p in points[:2500]])
    _check(cache, backend, [40, 600])
    assert len(index) == 500
    assert index._mat.shape[0] < rows_before
    fresh = _unit(np.random.default_rng(4), 700)
    cache.upsert(
        "items", [VectorPoint(f"n{k}", v, {"available": True}) for k, v in enumerate(fresh)]
    )
    _check(cache, backend, [40, 2000])
    assert len(index) == 1200
    backend.close()


def test_queries_on_one_thread_while_another_writes_stay_exact(tmp_path: Path) -> None:
    """A thread querying without pause while the main thread writes and announces 200 batches
    of changes raises nothing, and the answer after the last announcement equals the
    backend's."""
    backend = EdgeVectorStore(tmp_path / "qdrant")
    backend.ensure_collection("items", DIM)
    backend.upsert("items", _points(500))
    cache = CachedStore(backend, "items", resident_max=10_000)
    stop = threading.Event()
    errors: list[BaseException] = []
    answered = [0]

    def query() -> None:
        while not stop.is_set():
            try:
                cache.query_keys("items", _queries(4), 30, AVAILABLE)
                answered[0] += 1
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return

    thread = threading.Thread(target=query)
    thread.start()
    rng = random.Random(3)
    try:
        for n in range(200):
            fresh = _points(5, seed=100 + n, prefix=f"w{n}-")
            backend.upsert("items", fresh)
            gone = [f"i{rng.randrange(500)}" for _ in range(3)]
            backend.delete("items", gone)
            cache.invalidate([p.key for p in fresh] + gone)
    finally:
        stop.set()
        thread.join()
    assert not errors
    assert answered[0] > 0
    _check(cache, backend, [50, 1000])
    backend.close()


def test_other_filters_and_collections_go_to_the_store(backend: VectorStore) -> None:
    """A query with excluded keys, another payload condition or no filter is the backend's
    own answer (points the index never holds can come back)."""
    cache = CachedStore(backend, "items", resident_max=1000)
    queries = _queries(2)
    for flt in (
        None,
        Filter(must_equal={"available": False}),
        Filter(must_equal={"available": True}, exclude_keys=["i3", "i4"]),
    ):
        _assert_same(
            cache.query_keys("items", queries, 400, flt),
            backend.query_keys("items", queries, 400, flt),
        )
    assert len(cache.query_keys("items", queries, 400, None)[0]) == 300


def test_index_rejects_a_query_of_the_wrong_width(backend: VectorStore) -> None:
    """A query vector of another dimension is a ValueError naming both widths."""
    index = ResidentIndex(backend, "items", max_items=1000)
    with pytest.raises(ValueError, match="8-d query for 24-d"):
        index.query([np.ones(8, np.float32)], [5])
    with pytest.raises(ValueError, match="at least 1"):
        ResidentIndex(backend, "items", max_items=0)


def test_ranked_lists_are_the_same_with_and_without_the_index(tmp_path: Path) -> None:
    """For 60 users over 2,000 items (histories of 0 to 11 items, bought items, co-visitation
    maps, reviews), the lists scored by rows of the resident matrix have the same items in the
    same order with the same reasons as the lists the store's candidates give, and scores equal
    to float32 rounding. Items carry ``available`` as the encode step writes it (every seventh
    false): an item without the field is never a candidate of the matrix."""
    backend = EdgeVectorStore(tmp_path / "qdrant")
    for name in ("items", "reviews"):
        backend.ensure_collection(name, DIM)
    points = _points(2000)
    for point in points:
        point.payload.setdefault("available", True)
    backend.upsert("items", points)
    review_vecs = _unit(np.random.default_rng(4), 5)
    backend.upsert("reviews", [VectorPoint(f"r{k}", review_vecs[k]) for k in range(5)])
    cfg = RankingSettings(k=10)

    def recommender(resident: int | None) -> Recommender:
        cache = CachedStore(backend, "items", resident_max=resident)
        return Recommender(cache, cfg, Fusion.untrained(0.7), "items", "reviews")

    rng = random.Random(2)
    requests = []
    for u in range(60):
        state = UserState()
        for j in range(u % 12):
            kind = "purchase" if j % 4 == 3 else "view"
            state.recent.append(Interaction(f"i{rng.randrange(2000)}", kind, j, 1.0))
            if kind == "purchase":
                state.consumed.append(state.recent[-1].item_id)
        if u % 5 == 1:
            state.reviews.append(ReviewRef(f"r{u % 5}", f"i{rng.randrange(2000)}", "good"))
        neighbours = {
            inter.item_id: {f"i{rng.randrange(2000)}": float(rng.randint(1, 4)) for _ in range(30)}
            for inter in state.recent[-3:]
            if u % 3
        }
        requests.append(UserRequest(f"u{u}", state, neighbours))
    popular = {f"i{k}": float(k % 9) for k in range(0, 2000, 37)}
    with_index = recommender(10_000).recommend(requests, popular)
    without = recommender(None).recommend(requests, popular)
    assert [[(r.item_id, r.reasons) for r in lst] for lst in with_index] == [
        [(r.item_id, r.reasons) for r in lst] for lst in without
    ]
    np.testing.assert_allclose(
        [r.score for lst in with_index for r in lst],
        [r.score for lst in without for r in lst],
        atol=1e-5,
    )
    assert all(len(lst) == 10 for lst in with_index)
    reasons = {why for lst in with_index for r in lst for why in r.reasons}
    assert any(why.startswith("often viewed together") for why in reasons)
    assert any(why.startswith("close to your review") for why in reasons)
    assert "popular with other people right now" in reasons  # the user with no history
    for req, lst in zip(requests, with_index, strict=True):  # nothing bought or seen again
        assert not req.state.exclusions(True) & {r.item_id for r in lst}
    backend.close()


def test_lists_with_no_available_item_are_what_the_store_gives(tmp_path: Path) -> None:
    """With every item unavailable the resident matrix holds nothing: ranking neither fails nor
    waits on the index's lock, and gives the lists the store's candidates give (no items)."""
    backend = EdgeVectorStore(tmp_path / "qdrant")
    for name in ("items", "reviews"):
        backend.ensure_collection(name, DIM)
    points = _points(50)
    for point in points:
        point.payload["available"] = False
    backend.upsert("items", points)
    state = UserState()
    state.recent.append(Interaction("i3", "view", 1, 1.0))
    requests = [UserRequest("u", state, {"i3": {"i4": 2.0}}), UserRequest("v", UserState(), {})]
    popular = {"i5": 3.0}
    lists = []
    for resident in (1000, None):
        cache = CachedStore(backend, "items", resident_max=resident)
        rec = Recommender(cache, RankingSettings(k=5), Fusion.untrained(0.7), "items", "reviews")
        lists.append(rec.recommend(requests, popular))
    assert lists[0] == lists[1] == [[], []]
    backend.close()


def test_worker_store_holds_the_items_up_to_the_configured_limit(tmp_path: Path) -> None:
    """The worker's store keeps a resident index of at most ``vectors.resident_max_items``
    items, and none when the setting is 0."""
    on = Services(Settings(data_dir=tmp_path / "a"))
    off = Services(Settings(data_dir=tmp_path / "b", vectors={"resident_max_items": 0}))
    try:
        store = on.store()
        assert isinstance(store, CachedStore)
        assert store.resident is not None
        assert store.resident.max_items == 50_000
        store_off = off.store()
        assert isinstance(store_off, CachedStore)
        assert store_off.resident is None
    finally:
        on.close()
        off.close()
