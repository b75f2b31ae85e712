"""Congruence tests: Qdrant Edge and qdrant-client's local mode pass the same vector-store cases.

The ``store`` fixture runs every case on both backends; numpy brute-force cosine is the oracle.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from pydantic import SecretStr
from qdrant_client import QdrantClient

from infra.settings import Settings, VectorSettings
from infra.vectors import Filter, Hit, VectorPoint, VectorStore, open_vector_store
from infra.vectors.edge import EdgeVectorStore
from infra.vectors.server import QdrantServerStore

# qdrant-client's local mode warns that it ignores the payload indexes ensure_collection creates.
pytestmark = pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning")

DIM = 32
ITEMS = "items"
BACKENDS = ("edge", "server-local")


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    vectors = rng.normal(size=(n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _corpus(n: int = 200, seed: int = 7) -> list[VectorPoint]:
    """``n`` seeded unit vectors; user ``u0``..``u4`` round-robin, every fourth one unavailable."""
    vectors = _unit(np.random.default_rng(seed), n)
    return [
        VectorPoint(
            key=f"item-{i}",
            vector=vectors[i],
            payload={"key": f"item-{i}", "user_id": f"u{i % 5}", "available": i % 4 != 0},
        )
        for i in range(n)
    ]


def _queries(count: int = 6, seed: int = 11) -> list[np.ndarray]:
    """Seeded query vectors, deliberately not unit length: cosine must normalise them."""
    return list(3.0 * _unit(np.random.default_rng(seed), count))


def _brute_force(
    points: list[VectorPoint],
    query: np.ndarray,
    limit: int,
    keep: Callable[[VectorPoint], bool] = lambda _: True,
) -> list[tuple[str, float]]:
    """The exact top ``limit`` (key, cosine) among the points ``keep`` accepts."""
    kept = [p for p in points if keep(p)]
    matrix = np.stack([_vector(p).astype(np.float64) for p in kept])
    scores = matrix @ (query / np.linalg.norm(query))
    order = np.argsort(-scores, kind="stable")[:limit]
    return [(kept[i].key, float(scores[i])) for i in order]


def _vector(point: VectorPoint) -> np.ndarray:
    assert point.vector is not None
    return point.vector


def _assert_hits_equal(hits: list[Hit], expected: list[tuple[str, float]]) -> None:
    assert [hit.key for hit in hits] == [key for key, _ in expected]
    np.testing.assert_allclose([hit.score for hit in hits], [s for _, s in expected], atol=1e-5)


def _make_store(kind: str, tmp_path: Path) -> VectorStore:
    if kind == "edge":
        return EdgeVectorStore(tmp_path / "qdrant")
    return QdrantServerStore(QdrantClient(location=":memory:"))


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VectorStore]:
    """An empty ``items`` collection of 32-d vectors on each backend in turn."""
    vector_store = _make_store(request.param, tmp_path)
    vector_store.ensure_collection(ITEMS, DIM)
    yield vector_store
    vector_store.close()


@pytest.fixture
def filled(store: VectorStore) -> tuple[VectorStore, list[VectorPoint]]:
    """The ``store`` with the 200-point corpus upserted."""
    points = _corpus()
    store.upsert(ITEMS, points)
    return store, points


def test_upsert_then_retrieve_round_trips_vectors_and_payloads(store: VectorStore) -> None:
    """Retrieved points carry the upserted vector (float32) and payload, plus our key."""
    points = _corpus(5)
    points[1] = VectorPoint("item-1", points[1].vector, {"user_id": "u9", "tags": ["a", "b"]})
    store.upsert(ITEMS, points)
    got = store.retrieve(ITEMS, [p.key for p in points])
    assert sorted(got) == sorted(p.key for p in points)
    for point in points:
        vector = got[point.key].vector
        assert isinstance(vector, np.ndarray)
        assert vector.dtype == np.float32
        np.testing.assert_allclose(vector, _vector(point), atol=1e-6)
        assert got[point.key].payload == {**point.payload, "key": point.key}


def test_upsert_is_idempotent_and_the_latest_payload_wins(store: VectorStore) -> None:
    """Upserting one key twice leaves a single point holding the second payload and vector."""
    first, second = _unit(np.random.default_rng(1), 2)
    store.upsert(ITEMS, [VectorPoint("item-x", first, {"user_id": "u1", "available": True})])
    store.upsert(ITEMS, [VectorPoint("item-x", second, {"user_id": "u2", "available": False})])
    got = store.retrieve(ITEMS, ["item-x"])["item-x"]
    assert store.count(ITEMS) == 1
    assert got.payload == {"key": "item-x", "user_id": "u2", "available": False}
    np.testing.assert_allclose(_vector(got), second, atol=1e-6)


def test_payload_key_must_agree_with_point_key(store: VectorStore) -> None:
    """A payload ``key`` naming another point is rejected instead of silently overwritten."""
    vector = _unit(np.random.default_rng(2), 1)[0]
    with pytest.raises(ValueError, match="differs from point key"):
        store.upsert(ITEMS, [VectorPoint("item-a", vector, {"key": "item-b"})])
    assert store.count(ITEMS) == 0


def test_query_batch_matches_numpy_brute_force_cosine(
    filled: tuple[VectorStore, list[VectorPoint]],
) -> None:
    """Each query's hits are the exact cosine top-k, best first, with cosine-similarity scores."""
    store, points = filled
    queries = _queries()
    results = store.query_batch(ITEMS, queries, limit=10)
    assert len(results) == len(queries)
    for query, hits in zip(queries, results, strict=True):
        _assert_hits_equal(hits, _brute_force(points, query, 10))
        assert all(hit.payload["key"] == hit.key for hit in hits)


def test_query_batch_must_equal_keeps_only_matching_payloads(
    filled: tuple[VectorStore, list[VectorPoint]],
) -> None:
    """``must_equal`` on a bool and a keyword field returns the brute-force top-k of that subset."""
    store, points = filled
    cases: list[dict[str, str | bool | int]] = [
        {"available": True},
        {"available": False},
        {"user_id": "u1"},
        {"user_id": "u2", "available": True},
    ]
    queries = _queries()
    for must_equal in cases:
        results = store.query_batch(ITEMS, queries, limit=8, flt=Filter(must_equal=must_equal))
        keep = _payload_matches(must_equal)
        for query, hits in zip(queries, results, strict=True):
            _assert_hits_equal(hits, _brute_force(points, query, 8, keep))


def _payload_matches(must_equal: dict[str, str | bool | int]) -> Callable[[VectorPoint], bool]:
    return lambda p: all(p.payload.get(k) == v for k, v in must_equal.items())


def test_query_batch_exclude_keys_skips_those_points(
    filled: tuple[VectorStore, list[VectorPoint]],
) -> None:
    """Excluded keys never appear; the next-best points take their places."""
    store, points = filled
    query = _queries(1)[0]
    ranked = _brute_force(points, query, 13)
    excluded = [key for key, _ in ranked[:3]]
    [hits] = store.query_batch(ITEMS, [query], limit=10, flt=Filter(exclude_keys=excluded))
    _assert_hits_equal(hits, ranked[3:])


def test_query_batch_with_no_vectors_returns_no_lists(store: VectorStore) -> None:
    """An empty batch is answered with an empty list, not an engine error."""
    assert store.query_batch(ITEMS, [], limit=5) == []


def test_delete_removes_named_keys_and_ignores_unknown_ones(
    filled: tuple[VectorStore, list[VectorPoint]],
) -> None:
    """Deleted keys vanish from retrieve, count and queries; unknown keys are no error."""
    store, points = filled
    store.delete(ITEMS, ["item-3", "item-4", "no-such-item"])
    assert store.count(ITEMS) == len(points) - 2
    assert sorted(store.retrieve(ITEMS, ["item-3", "item-4", "item-5"])) == ["item-5"]
    [hits] = store.query_batch(ITEMS, [_vector(points[3])], limit=5)
    assert "item-3" not in [hit.key for hit in hits]


def test_delete_where_removes_every_point_of_one_user(
    filled: tuple[VectorStore, list[VectorPoint]],
) -> None:
    """``delete_where('user_id', 'u0')`` removes exactly that user's points."""
    store, points = filled
    store.delete_where(ITEMS, "user_id", "u0")
    survivors = [p.key for p in points if p.payload["user_id"] != "u0"]
    assert store.count(ITEMS) == len(survivors) == 160
    assert sorted(store.retrieve(ITEMS, [p.key for p in points])) == sorted(survivors)
    hits = store.query_batch(ITEMS, _queries(), limit=20, flt=Filter(must_equal={"user_id": "u0"}))
    assert hits == [[] for _ in range(6)]


def test_points_where_returns_one_users_points_with_vectors_up_to_the_limit(
    filled: tuple[VectorStore, list[VectorPoint]],
) -> None:
    """``points_where('user_id', 'u1')`` returns exactly u1's 40 points with their stored vectors,
    the same first 7 on every call when limited, and nothing for an unknown value."""
    store, points = filled
    mine = {p.key: p for p in points if p.payload["user_id"] == "u1"}
    found = store.points_where(ITEMS, "user_id", "u1", limit=1000)
    assert sorted(p.key for p in found) == sorted(mine)
    assert len(found) == 40
    for p in found:
        np.testing.assert_allclose(p.vector, _vector(mine[p.key]), atol=1e-6)
    first = [p.key for p in store.points_where(ITEMS, "user_id", "u1", limit=7)]
    assert len(first) == 7
    assert set(first) <= set(mine)
    assert [p.key for p in store.points_where(ITEMS, "user_id", "u1", limit=7)] == first
    assert store.points_where(ITEMS, "user_id", "nobody", limit=10) == []


def test_count_follows_upserts_and_deletes(store: VectorStore) -> None:
    """``count`` is 0 when empty and tracks inserts, re-upserts and deletes."""
    points = _corpus(30)
    assert store.count(ITEMS) == 0
    store.upsert(ITEMS, points[:20])
    store.upsert(ITEMS, points[10:])
    assert store.count(ITEMS) == 30
    store.delete(ITEMS, [p.key for p in points[:5]])
    assert store.count(ITEMS) == 25


def test_retrieve_omits_missing_keys_and_vectors_on_request(
    filled: tuple[VectorStore, list[VectorPoint]],
) -> None:
    """Missing keys are absent from the result; ``with_vectors=False`` leaves vector None."""
    store, _ = filled
    got = store.retrieve(ITEMS, ["item-7", "ghost", "item-7"], with_vectors=False)
    assert list(got) == ["item-7"]
    assert got["item-7"].vector is None
    assert got["item-7"].payload == {"key": "item-7", "user_id": "u2", "available": True}
    assert store.retrieve(ITEMS, ["ghost"]) == {}
    assert store.retrieve(ITEMS, []) == {}


def test_ensure_collection_is_idempotent_and_checks_the_dimension(
    filled: tuple[VectorStore, list[VectorPoint]],
) -> None:
    """A second ensure_collection keeps the data; one with another dimension raises."""
    store, points = filled
    store.ensure_collection(ITEMS, DIM)
    assert store.count(ITEMS) == len(points)
    with pytest.raises(ValueError, match="32-d"):
        store.ensure_collection(ITEMS, DIM + 1)


def test_collections_are_independent(filled: tuple[VectorStore, list[VectorPoint]]) -> None:
    """Points upserted into one collection are invisible in another."""
    store, points = filled
    store.ensure_collection("reviews", DIM)
    store.upsert("reviews", points[:3])
    assert store.count("reviews") == 3
    assert store.count(ITEMS) == len(points)
    store.delete_where("reviews", "user_id", "u1")
    assert store.count(ITEMS) == len(points)


def test_both_backends_return_identical_top_k(tmp_path: Path) -> None:
    """Edge and the qdrant-client double give the same keys in the same order for the same data."""
    points = _corpus(300, seed=3)
    flt = Filter(must_equal={"available": True}, exclude_keys=["item-1", "item-2"])
    answers = []
    for kind in BACKENDS:
        backend = _make_store(kind, tmp_path / kind)
        backend.ensure_collection(ITEMS, DIM)
        backend.upsert(ITEMS, points)
        answers.append(
            [
                backend.query_batch(ITEMS, _queries(8, seed=5), limit=15),
                backend.query_batch(ITEMS, _queries(8, seed=5), limit=15, flt=flt),
            ]
        )
        backend.close()
    edge, server = answers
    for edge_batch, server_batch in zip(edge, server, strict=True):
        for edge_hits, server_hits in zip(edge_batch, server_batch, strict=True):
            assert [h.key for h in edge_hits] == [h.key for h in server_hits]
            np.testing.assert_allclose(
                [h.score for h in edge_hits], [h.score for h in server_hits], atol=1e-5
            )
            assert [h.payload for h in edge_hits] == [h.payload for h in server_hits]


def test_edge_store_reopened_at_the_same_path_finds_its_data(tmp_path: Path) -> None:
    """After close, a new EdgeVectorStore on the same directory serves the same points."""
    points = _corpus()
    first = EdgeVectorStore(tmp_path / "qdrant")
    first.ensure_collection(ITEMS, DIM)
    first.upsert(ITEMS, points)
    first.delete(ITEMS, ["item-0"])
    first.close()

    reopened = EdgeVectorStore(tmp_path / "qdrant")
    assert reopened.count(ITEMS) == len(points) - 1
    got = reopened.retrieve(ITEMS, ["item-0", "item-9"])
    assert list(got) == ["item-9"]
    np.testing.assert_allclose(_vector(got["item-9"]), _vector(points[9]), atol=1e-6)
    query = _queries(1)[0]
    [hits] = reopened.query_batch(ITEMS, [query], limit=5, flt=Filter(must_equal={"user_id": "u1"}))
    expected = _brute_force(points, query, 5, _payload_matches({"user_id": "u1"}))
    _assert_hits_equal(hits, expected)
    reopened.ensure_collection(ITEMS, DIM)
    assert reopened.count(ITEMS) == len(points) - 1
    reopened.close()


def test_edge_optimize_builds_segments_without_changing_answers(tmp_path: Path) -> None:
    """optimize() reports work once past the indexing threshold, then none; hits stay exact."""
    points = _corpus()
    edge = EdgeVectorStore(tmp_path / "qdrant", indexing_threshold_kb=1)
    edge.ensure_collection(ITEMS, DIM)
    edge.upsert(ITEMS, points)
    assert edge.optimize() is True
    assert edge.optimize(ITEMS) is False
    queries = _queries()
    for query, hits in zip(queries, edge.query_batch(ITEMS, queries, limit=10), strict=True):
        _assert_hits_equal(hits, _brute_force(points, query, 10))
    edge.close()


HNSW_POINTS = 8000  # 384-d: 12 MB of vectors, above the 10,000 KB below which Edge full-scans


@pytest.fixture(scope="module")
def hnsw_shard(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """An Edge directory whose ``items`` collection holds random 384-d unit vectors (keys
    ``v<i>``) in an HNSW index built with m=12, ef_construct=64; and those vectors."""
    path = tmp_path_factory.mktemp("hnsw") / "qdrant"
    rng = np.random.default_rng(17)
    vectors = rng.normal(size=(HNSW_POINTS, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    edge = EdgeVectorStore(path, indexing_threshold_kb=1000, hnsw_m=12, hnsw_ef_construct=64)
    edge.ensure_collection(ITEMS, 384)
    edge.upsert(ITEMS, [VectorPoint(f"v{i}", v) for i, v in enumerate(vectors)])
    assert edge.optimize(ITEMS) is True
    edge.close()
    return path, vectors


def _hnsw_recall(path: Path, vectors: np.ndarray, ef: int, queries: np.ndarray) -> float:
    """Recall@10 of the shard at ``path`` searched with ``hnsw_ef=ef``, against numpy."""
    edge = EdgeVectorStore(path, hnsw_ef=ef)
    batches = edge.query_batch(ITEMS, list(queries), limit=10)
    edge.close()
    assert all(len(hits) == 10 for hits in batches)
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    found = [
        {int(h.key[1:]) for h in hits} & set(row.tolist())
        for hits, row in zip(batches, exact, strict=True)
    ]
    return sum(map(len, found)) / exact.size


def test_edge_hnsw_settings_persist_and_a_full_ef_search_equals_exact(
    hnsw_shard: tuple[Path, np.ndarray],
) -> None:
    """hnsw_m/ef_construct are written into the shard it creates (a later store's own values do
    not change them), and with hnsw_ef >= the point count the index returns the exact top-10."""
    path, vectors = hnsw_shard
    later = EdgeVectorStore(path, hnsw_m=32, hnsw_ef_construct=200)
    later.ensure_collection(ITEMS, 384)
    later.close()
    persisted = json.loads((path / ITEMS / "edge_config.json").read_text(encoding="utf-8"))
    assert (persisted["hnsw_config"]["m"], persisted["hnsw_config"]["ef_construct"]) == (12, 64)
    queries = _unit_rows(np.random.default_rng(23), 5)
    edge = EdgeVectorStore(path, hnsw_ef=HNSW_POINTS)
    answers = edge.query_batch(ITEMS, list(queries), limit=10)
    edge.close()
    points = [VectorPoint(f"v{i}", v) for i, v in enumerate(vectors)]
    for query, hits in zip(queries, answers, strict=True):
        _assert_hits_equal(hits, _brute_force(points, query, 10))


def test_edge_hnsw_ef_reaches_the_search(hnsw_shard: tuple[Path, np.ndarray]) -> None:
    """On the same index a small hnsw_ef finds clearly fewer true neighbours than a large one
    (so the search follows the graph with the ef given), and still returns ``limit`` hits."""
    path, vectors = hnsw_shard
    queries = _unit_rows(np.random.default_rng(29), 20)
    small, large = (_hnsw_recall(path, vectors, ef, queries) for ef in (10, HNSW_POINTS))
    assert large == 1.0
    assert small < 0.8


def _unit_rows(rng: np.random.Generator, n: int, dim: int = 384) -> np.ndarray:
    rows = rng.normal(size=(n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_edge_unknown_collection_raises_value_error(tmp_path: Path) -> None:
    """Using a collection never ensured is a ValueError, and names cannot escape the directory."""
    edge = EdgeVectorStore(tmp_path / "qdrant")
    with pytest.raises(ValueError, match="does not exist"):
        edge.count("missing")
    with pytest.raises(ValueError, match="collection name"):
        edge.ensure_collection("../outside", DIM)
    edge.close()


def test_open_vector_store_defaults_to_edge_under_the_data_dir(tmp_path: Path) -> None:
    """Without a URL the factory gives an Edge store that writes below ``settings.vectors_dir``."""
    settings = Settings(data_dir=tmp_path, vectors=VectorSettings())
    opened = open_vector_store(settings)
    assert isinstance(opened, EdgeVectorStore)
    opened.ensure_collection(ITEMS, DIM)
    opened.close()
    assert (settings.vectors_dir / ITEMS).is_dir()


@pytest.mark.filterwarnings("ignore:Api key is used with an insecure connection:UserWarning")
@pytest.mark.filterwarnings("ignore:Failed to obtain server version:UserWarning")
def test_open_vector_store_uses_the_server_when_a_url_is_set(tmp_path: Path) -> None:
    """With ``vectors.url`` set the factory gives a qdrant-client store and creates no Edge data."""
    vectors = VectorSettings(url="http://127.0.0.1:1", api_key=SecretStr("secret"))
    settings = Settings(data_dir=tmp_path, vectors=vectors)
    threads_before = set(threading.enumerate())
    opened = open_vector_store(settings)
    assert isinstance(opened, QdrantServerStore)
    opened.close()
    assert not settings.vectors_dir.exists()
    # qdrant-client checks the server version in a thread; let its (expected) warning land here.
    for thread in set(threading.enumerate()) - threads_before:
        thread.join(timeout=10)


def test_importing_infra_vectors_loads_no_qdrant_package() -> None:
    """``import infra.vectors`` works on a client-only install: neither Qdrant module is loaded."""
    code = (
        "import sys, infra.vectors; "
        "print(sorted(m for m in ('qdrant_edge', 'qdrant_client') if m in sys.modules))"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"
