"""The hot path's shortcuts keep their answers: the cached item table, keys-only vector queries,
the notices that keep worker caches coherent, and the vectorised ranking and serialisation."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import inspect
import json
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal
from unittest import mock

import numpy as np
import pytest
from aiokafka.partitioner import DefaultPartitioner
from faust.types import TP, Message
from qdrant_client import QdrantClient

from infra.kafka import producer_config, provision_topics
from infra.settings import RankingSettings, Settings
from infra.vectors import Filter, VectorPoint, VectorStore
from infra.vectors.cached import CachedStore
from infra.vectors.edge import EdgeVectorStore
from infra.vectors.server import QdrantServerStore
from models.ranking import ItemInfo, RankInput, explain, explain_all
from models.recommender import Recommender, UserRequest
from models.state import Fusion, ReviewRef, UserState, apply_interaction
from schemas.internal import EncodeRequest, UserUpdate
from schemas.topics import BEHAVIOR, DEAD_LETTER, RECOMMENDATIONS, USER_UPDATES, TopicSpec
from streams.encode import EncodeStep
from streams.ingest import ingest
from streams.sinks import (
    ITEMS_NOTICE_KEY,
    PACK_BYTES,
    Output,
    Sinks,
    UpdatePacker,
    partition_of,
    user_update_key,
)
from streams.topology import create_app, user_tables
from streams.transport import REFETCH_AFTER_S, ReadOffsets, SeekLedger, fresh
from streams.user_state import (
    Backlog,
    LocalUpdates,
    Tables,
    UserStateStep,
    absorb_or_isolate,
    update_user_state,
)

pytestmark = pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning")

DIM = 16
TS = 1_700_000_000_000


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _points(n: int = 120, seed: int = 3) -> list[VectorPoint]:
    vecs = _unit(np.random.default_rng(seed), n)
    return [
        VectorPoint(f"i{k}", vecs[k], {"title": f"Item {k}", "available": k % 5 != 0})
        for k in range(n)
    ]


class _Counting:
    """A real Edge store that counts the keys read through ``retrieve``."""

    def __init__(self, inner: EdgeVectorStore) -> None:
        self.inner = inner
        self.read: list[str] = []

    def retrieve(
        self, collection: str, keys: Sequence[str], *, with_vectors: bool = True
    ) -> dict[str, VectorPoint]:
        self.read.extend(keys)
        return self.inner.retrieve(collection, keys, with_vectors=with_vectors)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


@pytest.fixture
def edge(tmp_path: Path) -> Iterator[EdgeVectorStore]:
    store = EdgeVectorStore(tmp_path / "qdrant")
    store.ensure_collection("items", DIM)
    store.ensure_collection("reviews", DIM)
    store.upsert("items", _points())
    yield store
    store.close()


# --- the item table -------------------------------------------------------------------------------


def test_cached_store_reads_each_item_once_and_rereads_what_was_written(
    edge: EdgeVectorStore,
) -> None:
    """Repeated reads are served from memory (the backend sees each key once, an absent key
    included); a write through the cache, or an invalidation for a write made elsewhere, makes
    the next read return the new vector; other collections are never cached."""
    counting = _Counting(edge)
    cache = CachedStore(counting, "items")  # type: ignore[arg-type]
    first = cache.retrieve("items", ["i1", "i2", "nope"])
    again = cache.retrieve("items", ["i2", "i1", "nope"])
    assert sorted(first) == sorted(again) == ["i1", "i2"]
    assert sorted(counting.read) == ["i1", "i2", "nope"]
    np.testing.assert_array_equal(again["i1"].vector, edge.retrieve("items", ["i1"])["i1"].vector)

    new = np.zeros(DIM, np.float32)
    new[0] = 1.0
    cache.upsert("items", [VectorPoint("i1", new, {"title": "Renamed", "available": True})])
    cache.upsert("items", [VectorPoint("nope", new, {"title": "Now here", "available": True})])
    edge.upsert("items", [VectorPoint("i2", new, {"title": "Elsewhere", "available": True})])
    assert cache.retrieve("items", ["i2"])["i2"].payload["title"] == "Item 2"  # not told yet
    cache.invalidate(["i2"])
    got = cache.retrieve("items", ["i1", "i2", "nope"])
    assert {k: p.payload["title"] for k, p in got.items()} == {
        "i1": "Renamed",
        "i2": "Elsewhere",
        "nope": "Now here",
    }
    assert got["i1"].vector is not None
    assert got["i1"].vector.tolist() == new.tolist()
    cache.retrieve("reviews", ["r1"])
    cache.retrieve("reviews", ["r1"])
    assert counting.read.count("r1") == 2


def test_cached_store_stays_within_its_capacity_and_stays_correct(
    edge: EdgeVectorStore,
) -> None:
    """With room for 10 keys, reading 100 distinct items never holds more than 10 and every read
    still returns the stored point."""
    cache = CachedStore(edge, "items", capacity=10)
    for k in range(100):
        got = cache.retrieve("items", [f"i{k}", f"i{(k * 7) % 100}"])
        assert got[f"i{k}"].payload["title"] == f"Item {k}"
        assert len(cache) <= 10
    with pytest.raises(ValueError, match="capacity"):
        CachedStore(edge, "items", capacity=0)


@pytest.mark.parametrize("backend", ["edge", "server-local"])
def test_query_keys_gives_the_keys_and_scores_of_query_batch(backend: str, tmp_path: Path) -> None:
    """On both backends, the keys-only query returns exactly query_batch's keys, in its order,
    with its scores, under the availability filter; Edge's id-to-key memo answers the same on
    a second call; a limit per query gives each query its own prefix."""
    store: VectorStore
    if backend == "edge":
        store = EdgeVectorStore(tmp_path / "edge")
    else:
        store = QdrantServerStore(QdrantClient(path=str(tmp_path / "local")))
    store.ensure_collection("items", DIM)
    store.upsert("items", _points())
    queries = list(_unit(np.random.default_rng(9), 5))
    flt = Filter(must_equal={"available": True})
    full = store.query_batch("items", queries, 12, flt)
    for _ in range(2):
        keys = store.query_keys("items", queries, 12, flt)
        assert [list(k) for k in keys] == [[h.key for h in hits] for hits in full]
        for k, hits in zip(keys, full, strict=True):
            np.testing.assert_allclose(list(k.values()), [h.score for h in hits], atol=1e-6)
    assert all(int(key[1:]) % 5 != 0 for k in keys for key in k)
    own = store.query_keys("items", queries, [1, 3, 5, 8, 12], flt)
    assert [list(k) for k in own] == [
        [h.key for h in hits][:n] for hits, n in zip(full, [1, 3, 5, 8, 12], strict=True)
    ]
    with pytest.raises(ValueError, match="2 limits for 5 queries"):
        store.query_keys("items", queries, [1, 2], flt)
    assert store.query_keys("items", [], 5) == []
    store.close()


# --- notices --------------------------------------------------------------------------------------


class _Topic:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, bytes, int | None]] = []

    def send_soon(self, *, key: bytes, value: bytes, partition: int | None = None) -> None:
        self.sent.append((key, value, partition))


class _FixedEncoder:
    """Encodes every text to the same unit vector (the notices, not the maths, are under test)."""

    dim = DIM
    version = "fixed@1"

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), DIM), np.float32)
        out[:, 3] = 1.0
        return out


def test_encode_step_announces_changed_items_on_every_partition(edge: EdgeVectorStore) -> None:
    """After a batch that stores two items and removes one, one items_changed notice naming the
    three goes to each of the four user-updates partitions."""
    topic = _Topic()
    step = EncodeStep(
        encoder=_FixedEncoder(),  # type: ignore[arg-type]
        store=edge,
        items_collection="items",
        reviews_collection="reviews",
        sinks=Sinks({USER_UPDATES.name: topic}),
        executor=ThreadPoolExecutor(1),
        partitions=4,
    )
    kinds: list[tuple[Literal["item", "item_removed"], str]] = [
        ("item", "i1"),
        ("item", "new"),
        ("item_removed", "i2"),
    ]
    reqs = [
        EncodeRequest(event_id=f"e{n}", ts=TS, received_ms=TS, kind=kind, item_id=item, text="x")
        for n, (kind, item) in enumerate(kinds)
    ]
    asyncio.run(step.run([(r, None) for r in reqs]))
    assert [(key, part) for key, _, part in topic.sent] == [
        (b'"__items__"', p)
        for p in range(4)  # keyed as the table keys (JSON), on every partition
    ]
    assert len({value for _, value, _ in topic.sent}) == 1
    notice = UserUpdate.model_validate_json(topic.sent[0][1])
    assert (notice.kind, notice.item_ids) == ("items_changed", ["i1", "i2", "new"])


def test_user_state_step_drops_announced_items_and_ranks_with_their_new_state(
    edge: EdgeVectorStore,
) -> None:
    """A recommend step whose item table holds i1 explains lists by i1's title; when another
    process renames i1, the step keeps its cached copy until the items_changed notice, after
    which i1 is read again and the reasons quote the new title. The notice makes no list."""
    cache = CachedStore(edge, "items")
    cfg = RankingSettings(k=5)
    step = UserStateStep(
        tables=Tables(users={}, covisit={}, popularity={}),
        recommender=Recommender(
            cache, cfg, Fusion.untrained(cfg.behaviour_weight), "items", "reviews"
        ),
        store=cache,
        reviews_collection="reviews",
        sinks=Sinks({RECOMMENDATIONS.name: _Topic()}),
        model_version="test@1",
        max_recent=50,
    )

    def titles(n: int) -> set[str]:
        update = UserUpdate(
            event_id=f"b{n}",
            ts=TS + n,
            received_ms=TS,
            kind="behavior",
            user_id="u1",
            event_type="view",
            item_id="i1",
        )
        (event,) = step.run([update])
        assert len(event.items) == 5
        return {r for item in event.items for r in item.reasons if r.startswith("because")}

    assert titles(0) == {"because you viewed “Item 1”"}
    stored = edge.retrieve("items", ["i1"])["i1"]
    edge.upsert("items", [VectorPoint("i1", stored.vector, {**stored.payload, "title": "Lute"})])
    assert titles(1) == {"because you viewed “Item 1”"}  # the cache has not been told
    notice = UserUpdate(
        event_id="n1",
        ts=TS,
        received_ms=TS,
        kind="items_changed",
        user_id=ITEMS_NOTICE_KEY,
        event_type="items_changed",
        item_ids=["i1"],
    )
    assert step.run([notice]) == []
    assert titles(2) == {"because you viewed “Lute”"}


# --- ranking and serialisation --------------------------------------------------------------------


def test_user_state_record_is_compact_and_round_trips() -> None:
    """A state with views, a purchase, a rating (a weight of its own), a review and an unknown
    kind comes back equal from its table record; the record of the state without the odd kind is
    under half the size of the field-by-field ``asdict`` record, which still reads back."""
    state = UserState()
    for n, item in enumerate(["B000ASIN01", "B000ASIN02", "B000ASIN03"] * 6):
        apply_interaction(state, item, "view", TS + n * 1000, None, max_recent=50)
    apply_interaction(state, "B000ASIN04", "purchase", TS + 60_000, None, max_recent=50)
    apply_interaction(state, "B000ASIN05", "rating", TS + 61_000, 4.5, max_recent=50)
    state.reviews.append(ReviewRef("review:e9", "B000ASIN04", "Great strings"))
    state.last_event_id = "e21"
    record = state.to_dict()
    assert UserState.from_dict(json.loads(json.dumps(record))) == state
    assert record["k"] == "v" * 18 + "pr"
    compact = len(json.dumps(record, separators=(",", ":")))
    fields = json.dumps(dataclasses.asdict(state), separators=(",", ":"))
    assert compact < len(fields) / 2
    assert UserState.from_dict(json.loads(fields)) == state
    apply_interaction(state, "B000ASIN06", "wishlist", TS + 62_000, None, max_recent=50)
    odd = json.loads(json.dumps(state.to_dict()))
    assert odd["k"][-1] == "wishlist"
    assert UserState.from_dict(odd) == state
    assert UserState.from_dict(UserState().to_dict()) == UserState()


def test_explain_all_gives_each_items_explain_reasons() -> None:
    """The batched explanation (one matrix product per kind) gives, for every picked item, the
    same reasons as explaining it alone: history, review, co-visitation and popularity cases."""
    rng = np.random.default_rng(5)
    vecs = _unit(rng, 8)
    items = {f"x{k}": ItemInfo(f"x{k}", vecs[k], f"Title {k}") for k in range(8)}
    state = UserState()
    for k, kind in [(0, "view"), (1, "purchase"), (0, "click")]:
        apply_interaction(state, f"x{k}", kind, TS + k, None, max_recent=10)
    reviews = [ReviewRef("r1", "x1", "Lovely"), ReviewRef("r2", "x9", "Odd")]
    review_vectors = {"r1": _unit(rng, 1)[0]}
    inp = RankInput(
        query=vecs[0],
        history=state.recent,
        reviews=reviews,
        exclude=set(),
        similar={},
        covisit={"x4": 0.9},
        covisit_source={"x4": "x1"},
        lead={"x5": "popular"},
    )
    picked = [items[f"x{k}"] for k in range(2, 8)]
    batched = explain_all(picked, inp, items, review_vectors)
    assert batched == [explain(p, inp, items, review_vectors) for p in picked]
    assert batched[2][0] == "often viewed together with “Title 1”"
    assert batched[3][0] == "popular with other people right now"
    assert explain_all([], inp, items, review_vectors) == []
    bare = RankInput(query=None, history=[], reviews=[], exclude=set(), similar={})
    assert explain_all(picked[:1], bare, items, {}) == [["popular with other people right now"]]


def test_recommender_gives_the_same_lists_through_the_cache(edge: EdgeVectorStore) -> None:
    """The same users ranked over the bare store and over the cached store get identical lists
    (items, scores and reasons)."""
    cfg = RankingSettings(k=6)

    def lists(store: VectorStore) -> list[list[tuple[str, float, list[str]]]]:
        rec = Recommender(store, cfg, Fusion.untrained(cfg.behaviour_weight), "items", "reviews")
        requests = []
        for u in range(4):
            state = UserState()
            for n in range(5):
                apply_interaction(state, f"i{u * 11 + n * 3}", "view", TS + n, None, max_recent=50)
            requests.append(UserRequest(f"u{u}", state, {f"i{u * 11}": {"i50": 3.0, "i51": 1.0}}))
        out = rec.recommend(requests, {"i60": 5.0, "i61": 2.0})
        return [[(r.item_id, r.score, r.reasons) for r in ranked] for ranked in out]

    cache = CachedStore(edge, "items")
    assert lists(edge) == lists(cache) == lists(cache)


def test_a_worker_indexes_the_items_it_opens_once(tmp_path: Path) -> None:
    """Opening the store through the worker's services builds the HNSW index of an items
    collection large enough to be indexed (8,000 384-d points), so a second optimize finds
    nothing to do; a collection too small to index is left as it was."""
    from streams.services import index_items

    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(8000, 384)).astype(np.float32)
    store = EdgeVectorStore(tmp_path / "big")
    store.ensure_collection("items", 384)
    for lo in range(0, 8000, 2000):
        store.upsert(
            "items",
            [VectorPoint(f"i{n}", vectors[n], {"available": True}) for n in range(lo, lo + 2000)],
        )
    index_items(store, "items")
    assert store.optimize("items") is False
    store.close()
    small = EdgeVectorStore(tmp_path / "small")
    small.ensure_collection("items", 384)
    small.upsert("items", [VectorPoint("a", vectors[0], {"available": True})])
    index_items(small, "items")
    assert small.query_keys("items", [vectors[0]], 1) == [{"a": pytest.approx(1.0, abs=1e-5)}]
    small.close()


def _behaviour(n: int, user: str, item: str, *, received_ms: int = TS) -> UserUpdate:
    return UserUpdate(
        event_id=f"b{n}",
        ts=TS + n,
        received_ms=received_ms,
        kind="behavior",
        user_id=user,
        event_type="click" if n % 2 else "view",
        item_id=item,
    )


def _backlog_step(edge: EdgeVectorStore) -> tuple[UserStateStep, Tables, _Topic]:
    cfg = RankingSettings(k=5)
    tables = Tables(users={}, covisit={}, popularity={})
    topic = _Topic()
    rec = Recommender(edge, cfg, Fusion.untrained(cfg.behaviour_weight), "items", "reviews")
    return (
        UserStateStep(
            tables=tables,
            recommender=rec,
            store=edge,
            reviews_collection="reviews",
            sinks=Sinks({RECOMMENDATIONS.name: topic, DEAD_LETTER.name: topic}),
            model_version="test@1",
            max_recent=50,
        ),
        tables,
        topic,
    )


def _lists(topic: _Topic) -> list[tuple[str, str, list[str]]]:
    """(user, trigger, items) of each list sent, in order."""
    out = []
    for _, value, _ in topic.sent:
        body = json.loads(value)
        if "items" in body:
            out.append(
                (body["user_id"], body["trigger_event_id"], [i["item_id"] for i in body["items"]])
            )
    return out


def test_the_backlog_ranks_the_lists_of_the_inline_step(edge: EdgeVectorStore) -> None:
    """The worker absorbs a batch into the tables and ranks its users from the backlog on a
    thread; for the same updates it writes the same tables and sends the same lists, in the same
    order, as the inline step."""
    updates = [_behaviour(n, f"u{n % 3}", f"i{(n * 7) % 100}") for n in range(12)]
    inline, inline_tables, inline_topic = _backlog_step(edge)
    inline.run(updates)
    step, tables, topic = _backlog_step(edge)

    async def go() -> None:
        backlog = Backlog(step, ThreadPoolExecutor(1), round_size=256, limit=100)
        backlog.start()
        absorb_or_isolate(step, [(u, None) for u in updates], backlog)
        assert sorted(backlog.waiting) == ["u0", "u1", "u2"]
        await backlog.close(10.0)

    asyncio.run(go())
    assert _lists(topic) == _lists(inline_topic)
    assert [u for u, _, _ in _lists(topic)] == ["u0", "u1", "u2"]
    assert tables == inline_tables


def test_a_waiting_user_gets_one_list_for_every_event_since_their_last(
    edge: EdgeVectorStore,
) -> None:
    """Three batches absorbed while the ranking is busy leave each user waiting once: the next
    round sends one list per user, naming their newest event as its trigger, with its latency
    counted from their oldest unanswered event; the state holds all the events."""
    step, tables, topic = _backlog_step(edge)

    async def go() -> None:
        backlog = Backlog(step, ThreadPoolExecutor(1), round_size=256, limit=100)  # not started
        for n in range(9):
            batch = [(_behaviour(n, f"u{n % 2}", f"i{n + 1}", received_ms=TS + n * 1000), None)]
            absorb_or_isolate(step, batch, backlog)
        assert list(backlog.waiting) == ["u0", "u1"]
        assert backlog.waiting["u0"].trigger.event_id == "b0"
        assert await backlog.rank_round() == 2
        assert await backlog.rank_round() == 0

    asyncio.run(go())
    sent = [json.loads(v) for _, v, _ in topic.sent]
    assert [(b["user_id"], b["trigger_event_id"]) for b in sent] == [("u0", "b8"), ("u1", "b7")]
    assert sent[0]["latency_ms"] > sent[1]["latency_ms"]  # u0 waits since b0 (at TS), u1 since b1
    assert sent[0]["latency_ms"] - sent[1]["latency_ms"] == pytest.approx(1000, abs=500)
    assert UserState.from_dict(tables.users["u0"]).events == 5
    assert UserState.from_dict(tables.users["u1"]).events == 4


def test_a_full_backlog_holds_the_agent_until_a_round_frees_room(edge: EdgeVectorStore) -> None:
    """With ``limit`` users waiting, room() does not return until the ranking task has taken a
    round; below the limit it returns at once."""
    step, _, topic = _backlog_step(edge)

    async def go() -> list[str]:
        backlog = Backlog(step, ThreadPoolExecutor(1), round_size=1, limit=2)
        backlog.start()
        order: list[str] = []
        absorb_or_isolate(step, [(_behaviour(0, "a", "i1"), None)], backlog)
        await backlog.room()
        order.append(f"room with {len(backlog.waiting)} waiting")
        absorb_or_isolate(
            step, [(_behaviour(1, "b", "i2"), None), (_behaviour(2, "c", "i3"), None)], backlog
        )
        assert len(backlog.waiting) >= 2
        await backlog.room()
        order.append(f"room with {len(backlog.waiting)} waiting")
        await backlog.close(10.0)
        return order

    order = asyncio.run(go())
    assert order[1] == "room with 1 waiting"
    assert sorted(u for u, _, _ in _lists(topic)) == ["a", "b", "c"]


def test_a_user_whose_ranking_fails_is_dead_lettered_and_the_round_goes_on(
    edge: EdgeVectorStore,
) -> None:
    """A data error while ranking a round is isolated: the round is ranked user by user, the
    failing user's triggering update goes to the dead-letter topic with its original bytes, and
    everyone else gets a list; an infrastructure error stops the agent instead."""
    from types import SimpleNamespace

    step, _, topic = _backlog_step(edge)
    recommend = step.recommender.recommend

    def poisoned(requests, popular):  # type: ignore[no-untyped-def]
        if any(r.user_id == "poison" for r in requests):
            raise ValueError("cannot rank this user")
        return recommend(requests, popular)

    step.recommender.recommend = poisoned  # type: ignore[method-assign]
    raw = SimpleNamespace(value=b"raw-poison", topic=USER_UPDATES.name, partition=0, offset=7)

    async def go() -> None:
        backlog = Backlog(step, ThreadPoolExecutor(1), round_size=256, limit=100)
        backlog.start()
        batch = [
            (_behaviour(0, "a", "i1"), None),
            (_behaviour(1, "poison", "i2"), raw),
            (_behaviour(2, "b", "i3"), None),
        ]
        absorb_or_isolate(step, batch, backlog)
        await backlog.close(10.0)

    asyncio.run(go())
    assert [u for u, _, _ in _lists(topic)] == ["a", "b"]
    letters = [json.loads(v) for _, v, _ in topic.sent if b"payload_b64" in v]
    assert [(d["stage"], d["error_type"]) for d in letters] == [("update-user-state", "ValueError")]
    assert letters[0]["payload_b64"] == "cmF3LXBvaXNvbg=="  # b"raw-poison"

    def broken(requests, popular):  # type: ignore[no-untyped-def]
        raise ConnectionError("vector store gone")

    step.recommender.recommend = broken  # type: ignore[method-assign]

    async def infra() -> None:
        backlog = Backlog(step, ThreadPoolExecutor(1), round_size=256, limit=1)
        backlog.start()
        absorb_or_isolate(step, [(_behaviour(3, "d", "i4"), None)], backlog)
        for _ in range(200):  # the agent asks for room after every batch
            await backlog.room()
            await asyncio.sleep(0.05)

    with pytest.raises(ConnectionError, match="vector store gone"):
        asyncio.run(infra())


def _old_batch(b: int) -> list[SimpleNamespace]:
    """Batch ``b`` of four behaviour updates of users u0 and u1 (events b{4b} to b{4b+3}), as
    events whose messages were written 10 s ago: an agent taking them is behind."""
    updates = [_behaviour(b * 4 + n, f"u{n % 2}", f"i{b * 4 + n + 1}") for n in range(4)]
    return [
        SimpleNamespace(
            message=SimpleNamespace(
                value=u.model_dump_json().encode(),
                timestamp=time.time() - 10.0,
                topic=USER_UPDATES.name,
                partition=0,
                offset=b * 4 + n,
            )
        )
        for n, u in enumerate(updates)
    ]


def _run_deferring(stream: object, step: UserStateStep, **extra: Any) -> None:
    """The user-state agent over ``stream``, ranking on its own thread with a 600 s deferral
    while behind."""
    asyncio.run(
        update_user_state(
            stream,
            step=step,
            batch_size=500,
            batch_wait_s=0.005,
            executor=ThreadPoolExecutor(1),
            max_delay_s=600.0,
            **extra,
        )
    )


def test_a_behind_agent_defers_ranking_and_a_stop_ranks_everyone_waiting(
    edge: EdgeVectorStore,
) -> None:
    """The agent fed updates written 10 s ago is behind: with a long deferral it absorbs batch
    after batch and sends no list while its input lasts; when its stream ends (Faust ends an
    agent's stream to stop it), every waiting user gets one list naming their newest event."""
    step, tables, topic = _backlog_step(edge)
    seen_before_end: list[int] = []

    class Stream:
        async def take_events(self, batch_size: int, within: float):  # type: ignore[no-untyped-def]
            for b in range(3):
                seen_before_end.append(len(_lists(topic)))
                yield _old_batch(b)
                await asyncio.sleep(0.05)  # time for a ranking round, were one due
            seen_before_end.append(len(_lists(topic)))

    _run_deferring(Stream(), step)
    assert seen_before_end == [0, 0, 0, 0]
    assert [(u, t) for u, t, _ in _lists(topic)] == [("u0", "b10"), ("u1", "b11")]
    assert UserState.from_dict(tables.users["u0"]).events == 6


@pytest.mark.parametrize("left", [True, False])
def test_a_behind_agent_that_idles_waits_to_rank_while_its_input_has_records_left(
    edge: EdgeVectorStore, left: bool
) -> None:
    """A behind agent that takes no batch for longer than IDLE_S has caught up, and its waiting
    users are ranked, unless its input still has records it has not taken (a slow fetch): then
    ranking keeps waiting for the deferral, and the users get their lists when the stream
    ends, each naming their newest event."""
    from streams.user_state import IDLE_S

    step, _, topic = _backlog_step(edge)
    after_idle: list[int] = []

    class Stream:
        async def take_events(self, batch_size: int, within: float):  # type: ignore[no-untyped-def]
            for b in range(2):
                yield _old_batch(b)
                await asyncio.sleep(IDLE_S * 4)  # no batch: idle, with records left or not
                after_idle.append(len(_lists(topic)))

    _run_deferring(Stream(), step, lagging=lambda: left)
    assert after_idle == ([0, 0] if left else [2, 4])
    assert [(u, t) for u, t, _ in _lists(topic)][-2:] == [("u0", "b6"), ("u1", "b7")]


def test_the_worker_producer_lingers_as_configured(tmp_path: Path) -> None:
    """The Faust app takes its producer linger from the Kafka settings (2 ms by default), so a
    busy worker batches its produced messages instead of one request per message."""
    from infra.settings import KafkaSettings, Settings
    from streams.topology import create_app

    default = create_app(Settings(data_dir=tmp_path), "all")
    assert default.conf.producer_linger == pytest.approx(0.002)
    tuned = Settings(data_dir=tmp_path, kafka=KafkaSettings(producer_linger_ms=7))
    assert create_app(tuned, "ingest").conf.producer_linger == pytest.approx(0.007)


def test_forget_announces_the_rebuilt_profiles_after_writing_them(edge: EdgeVectorStore) -> None:
    """Forgetting u1 rebuilds the review-described item t from u2's review alone, and the
    items_changed notice naming t goes to each partition only after that write: a worker that
    drops t on the notice reads the new profile (1 review), never the old one (2)."""
    vecs = _unit(np.random.default_rng(4), 3)
    edge.upsert(
        "items",
        [VectorPoint("t", vecs[0], {"title": "t", "text_source": "reviews", "reviews": 2})],
    )
    edge.upsert(
        "reviews",
        [
            VectorPoint("review:r1", vecs[1], {"user_id": "u1", "item_id": "t"}),
            VectorPoint("review:r2", vecs[2], {"user_id": "u2", "item_id": "t"}),
        ],
    )
    seen: list[tuple[int | None, list[str] | None, int]] = []

    class Notices:
        def send_soon(self, *, key: bytes, value: bytes, partition: int | None = None) -> None:
            notice = UserUpdate.model_validate_json(value)
            stored = edge.retrieve("items", ["t"])["t"].payload["reviews"]
            seen.append((partition, notice.item_ids, stored))

    cfg = RankingSettings(k=5)
    step = UserStateStep(
        tables=Tables(users={}, covisit={}, popularity={}),
        recommender=Recommender(
            edge, cfg, Fusion.untrained(cfg.behaviour_weight), "items", "reviews"
        ),
        store=edge,
        reviews_collection="reviews",
        sinks=Sinks({USER_UPDATES.name: Notices(), RECOMMENDATIONS.name: _Topic()}),
        model_version="test@1",
        max_recent=50,
        partitions=2,
    )
    forget = UserUpdate(
        event_id="f1", ts=TS, received_ms=TS, kind="forget", user_id="u1", event_type="forget_user"
    )
    assert step.run([forget]) == []
    assert seen == [(0, ["t"], 1), (1, ["t"], 1)]


class _Batches:
    """A Faust stream's ``take_events`` over fixed batches of messages."""

    def __init__(self, *batches: list[SimpleNamespace]) -> None:
        self.batches = batches

    async def take_events(self, size: int, within: float):  # type: ignore[no-untyped-def]
        for batch in self.batches:
            yield [SimpleNamespace(message=m) for m in batch]


def _message(value: bytes, offset: int, topic: str = BEHAVIOR.name) -> SimpleNamespace:
    return SimpleNamespace(value=value, topic=topic, partition=0, offset=offset, timestamp=TS / 1e3)


def test_ingest_sends_one_message_per_partition_that_the_user_state_step_reads_in_order() -> None:
    """The ingest hop packs a batch's user updates into one message per partition of the
    user-updates topic: each pack goes to the partition Kafka's default partitioner gives its
    users' keys (so a user's updates, state and REST requests share one), each user's updates
    keep their order, an input that does not validate is still dead-lettered alone, and the
    user-state step's parser reads back exactly the updates that went in."""
    rng = np.random.default_rng(5)
    for n in (1, 3, 4, 7):
        ids = list(range(n))
        for k in rng.integers(0, 10**9, size=200):
            key = user_update_key(f"user-{k}")
            assert partition_of(key, n) == DefaultPartitioner()(key, ids, ids)

    events = [
        {"type": "click", "event_id": f"e{n}", "ts": TS + n, "user_id": f"u{n % 9}", "item_id": "i"}
        for n in range(60)
    ]
    batch = [_message(json.dumps(e).encode(), n) for n, e in enumerate(events)]
    batch.insert(30, _message(b"{not json", 99))
    topic, letters = _Topic(), _Topic()
    sinks = Sinks({USER_UPDATES.name: topic, DEAD_LETTER.name: letters})
    asyncio.run(
        ingest(_Batches(batch), sinks=sinks, batch_size=100, batch_wait_s=0.01, partitions=4)
    )

    assert 1 < len(topic.sent) <= 4
    assert len({p for _, _, p in topic.sent}) == len(topic.sent)
    read = sinks.parse(
        [
            SimpleNamespace(message=_message(v, n, USER_UPDATES.name))
            for n, (_, v, _) in enumerate(topic.sent)
        ],
        UserUpdate,
        stage="test",
        lines=True,
    )
    by_partition = {n: p for n, (_, _, p) in enumerate(topic.sent)}
    for update, origin in read:
        assert by_partition[origin.offset] == partition_of(user_update_key(update.user_id), 4)
    got = sorted((u.user_id, int(u.event_id[1:])) for u, _ in read)
    assert got == sorted((e["user_id"], int(e["event_id"][1:])) for e in events)
    for user in {e["user_id"] for e in events}:  # each user's updates in their original order
        mine = [int(u.event_id[1:]) for u, _ in read if u.user_id == user]
        assert mine == sorted(mine)
    assert len(letters.sent) == 1
    assert json.loads(letters.sent[0][1])["payload_b64"] == "e25vdCBqc29u"  # b"{not json"


def test_a_pack_fills_at_its_byte_bound_and_a_bad_record_in_it_is_dead_lettered_alone() -> None:
    """A pack that reaches PACK_BYTES is sent at once and the next update starts a new one; when
    one record of a pack does not validate, the others are read and the dead letter carries
    that record's own bytes and the pack's topic, partition and offset."""
    packer = UpdatePacker(1)
    line = _behaviour(0, "u", "i").model_dump_json().encode()
    per_pack = -(-PACK_BYTES // (len(line) + 1))  # lines (each with its newline) that fill one
    out = Output(USER_UPDATES, "u", line)
    filled = [pack for _ in range(per_pack + 3) for pack in packer.add(out)]
    assert len(filled) == 1
    assert filled[0].value.count(b"\n") + 1 == per_pack
    assert [out.value.count(b"\n") + 1 for out in packer.drain()] == [3]
    assert packer.drain() == []

    letters = _Topic()
    sinks = Sinks({DEAD_LETTER.name: letters})
    good = [_behaviour(n, "u", f"i{n}").model_dump_json().encode() for n in range(2)]
    pack = _message(b"\n".join([good[0], b'{"kind": "behavior"}', good[1]]), 41, USER_UPDATES.name)
    read = sinks.parse([SimpleNamespace(message=pack)], UserUpdate, stage="test", lines=True)
    assert [u.event_id for u, _ in read] == ["b0", "b1"]
    assert [o.value for _, o in read] == good
    (letter,) = [json.loads(v) for _, v, _ in letters.sent]
    assert base64.b64decode(letter["payload_b64"]) == b'{"kind": "behavior"}'
    assert (letter["topic"], letter["partition"], letter["offset"]) == (USER_UPDATES.name, 0, 41)


def _users_of(partitions: set[int], count: int, of: int = 4) -> list[str]:
    """``count`` user ids whose updates go to ``partitions`` of an ``of``-partition topic."""
    found, n = [], 0
    while len(found) < count:
        if partition_of(user_update_key(f"u{n}"), of) in partitions:
            found.append(f"u{n}")
        n += 1
    return found


def test_ingest_applies_the_updates_of_held_partitions_itself_once_its_barriers_are_back(
    edge: EdgeVectorStore,
) -> None:
    """A worker holding user-update partitions 0 and 2 of 4 sends a barrier to each on its
    assignment, and its ingest agent waits (nothing applied, nothing sent) until both have been
    read back; a barrier of another assignment does not count. Then the users of partitions 0
    and 2 are written to the tables straight from the batch, in event order, and ranked from
    the backlog (one list each, naming their newest event), while the other users' updates
    still leave as packs for partitions 1 and 3; a bad input is dead-lettered. After a
    revocation nothing is applied locally."""
    step, tables, _ = _backlog_step(edge)
    updates, letters, lists = _Topic(), _Topic(), _Topic()
    sinks = Sinks(
        {USER_UPDATES.name: updates, DEAD_LETTER.name: letters, RECOMMENDATIONS.name: lists}
    )
    step.sinks = sinks
    here, there = _users_of({0, 2}, 4), _users_of({1, 3}, 4)
    users = [u for pair in zip(here, there, strict=True) for u in pair]
    events = [
        {
            "type": "view",
            "event_id": f"e{n}",
            "ts": TS + n,
            "user_id": users[n % 8],
            "item_id": f"i{n + 1}",
        }
        for n in range(40)
    ]
    batch = [_message(json.dumps(e).encode(), n) for n, e in enumerate(events)]
    batch.insert(7, _message(b"{not json", 99))
    local = LocalUpdates(step, USER_UPDATES.name)

    async def go() -> None:
        backlog = Backlog(step, ThreadPoolExecutor(1), round_size=256, limit=100)
        backlog.start()
        local.backlog = backlog
        local.assigned([TP(USER_UPDATES.name, 0), TP(BEHAVIOR.name, 1), TP(USER_UPDATES.name, 2)])
        assert [(key, p) for key, _, p in updates.sent] == [
            (b'"__barrier__"', 0),
            (b'"__barrier__"', 2),
        ]
        token = UserUpdate.model_validate_json(updates.sent[0][1]).event_id
        run = asyncio.ensure_future(
            ingest(
                _Batches(batch),
                sinks=sinks,
                batch_size=100,
                batch_wait_s=0.01,
                partitions=4,
                local=local,
            )
        )
        for arrival in [("barrier-of-another-assignment", 0), (token, 0), (token, 0)]:
            local.arrived(*arrival)
            await asyncio.sleep(0.05)
            assert not run.done()
            assert (tables.users, len(updates.sent), letters.sent) == ({}, 2, [])
        local.arrived(token, 2)
        await run
        await backlog.close(10.0)

    asyncio.run(go())
    for user in here:  # applied here, in order
        state = tables.state(user)
        assert [i.item_id for i in state.recent] == [
            f"i{n + 1}" for n in range(40) if users[n % 8] == user
        ]
    assert set(tables.users) == set(here)
    assert sorted(_lists(lists)) == sorted(
        (u, f"e{max(n for n in range(40) if users[n % 8] == u)}", mock.ANY) for u in here
    )
    packs = updates.sent[2:]
    assert sorted(p for _, _, p in packs) == [1, 3]
    sent = [UserUpdate.model_validate_json(line) for _, v, _ in packs for line in v.split(b"\n")]
    assert sorted(u.event_id for u in sent) == sorted(
        e["event_id"] for e in events if e["user_id"] in there
    )
    assert [json.loads(v)["error_type"] for _, v, _ in letters.sent] == ["bad_json"]
    local.revoked()
    assert not any(local.owns(p) for p in range(4))


def test_the_user_state_agent_passes_on_a_barrier_after_the_updates_sent_before_it(
    edge: EdgeVectorStore,
) -> None:
    """A batch that carries a pack of updates and then this assignment's barrier: the barrier
    reaches the local path only once the pack is in the tables, makes no state of its own, and
    readies the path; the local path is off again once the agent stops."""
    step, tables, _ = _backlog_step(edge)
    updates = _Topic()
    step.sinks = Sinks({USER_UPDATES.name: updates, RECOMMENDATIONS.name: _Topic()})
    local = LocalUpdates(step, USER_UPDATES.name)
    local.assigned([TP(USER_UPDATES.name, 0)])
    user = "u0"
    pack = b"\n".join(_behaviour(n, user, f"i{n + 1}").model_dump_json().encode() for n in range(3))
    ((_, barrier, _),) = updates.sent
    seen: list[int] = []
    arrived = local.arrived

    def record(token: str, partition: int) -> None:
        seen.append(len(tables.state(user).recent))
        arrived(token, partition)

    local.arrived = record  # type: ignore[method-assign]
    stream = _Batches(
        [
            _message(pack, 0, USER_UPDATES.name),
            _message(barrier, 1, USER_UPDATES.name),
        ]
    )

    async def go() -> None:
        await update_user_state(
            stream,
            step=step,
            batch_size=100,
            batch_wait_s=0.01,
            executor=ThreadPoolExecutor(1),
            local=local,
        )

    asyncio.run(go())
    assert seen == [3]
    assert set(tables.users) == {user}
    assert local.backlog is None
    assert not local.owns(0)
    asyncio.run(asyncio.wait_for(local.ready(), 1.0))


def test_records_drained_before_their_partitions_latest_seek_are_left() -> None:
    """A record stamped, as it was drained, with its partition's seek count is stale once the
    partition is sought again (the seek reads it again), and the agents leave it; a record of
    another partition, one drained after the seek, and a message with no stamp are kept."""
    ledger = SeekLedger()
    a, b = TP(BEHAVIOR.name, 0), TP(BEHAVIOR.name, 1)
    early_a, early_b, late_a, unknown = (
        Message(tp.topic, tp.partition, n, TS / 1e3, 0, [], None, b"{}", None, tp=tp)
        for n, tp in enumerate([a, b, a, a])
    )
    stamps = {early_a: ledger.count(a), early_b: ledger.count(b)}  # drained in one batch
    ledger.moved(a, 0)  # partition a sought back to offset 0
    stamps[late_a] = ledger.count(a)  # drained after the seek
    assert stamps == {early_a: 0, early_b: 0, late_a: 1}
    events = [SimpleNamespace(message=m) for m in (early_a, early_b, late_a, unknown)]

    def outdated(message: Message) -> bool:
        stamp = stamps.get(message)
        return stamp is not None and ledger.stale(message.tp, stamp)

    kept = fresh(events, outdated, "test")
    assert [e.message for e in kept] == [early_b, late_a, unknown]
    assert fresh(events, None, "test") == events


def test_a_seek_sets_the_read_position_before_the_first_record_drained_after_it() -> None:
    """The read position kept per partition is set to a seek's target before the first record
    drained after that seek goes out, even while Faust's own store of the target has not come
    yet (it comes once the seek has returned to the app's loop), and a record drained before
    the seek cannot move it when the fetcher stores its offset after the seek. Faust's check
    against it (records below it dropped as already read) stays on for changelogs only; an
    input topic's records are judged by their seek counts."""
    ledger = SeekLedger()
    for topic in ("recstream-user-state-changelog", BEHAVIOR.name):
        tp = TP(topic, 0)
        offsets = ReadOffsets(ledger)
        offsets.handing_out(tp, ledger.count(tp))
        offsets[tp] = 180  # the fetcher handed out offsets up to 180
        # a seek back to the committed offset 117 moves the position on the consumer thread,
        # and records from 117 on are drained at once
        ledger.moved(tp, 117)
        offsets.handing_out(tp, ledger.count(tp))
        assert offsets.get(tp) == 117  # 117 itself passes Faust's check (offset >= position)
        offsets[tp] = 117
        offsets[tp] = 118
        assert offsets.get(tp) == 118
        offsets.handing_out(tp, ledger.count(tp))  # the target is set once per seek
        assert offsets.get(tp) == 118
        # a record drained before a further seek is in the fetcher's hands as the seek lands:
        # its offset is not stored, so the records read again from the target are not dropped
        offsets.handing_out(tp, ledger.count(tp))  # record 119 goes out
        ledger.moved(tp, 117)
        offsets[tp] = 119
        assert offsets.get(tp) == 118
        offsets[tp] = 117  # Faust's own store of the target, once the seek has returned
        assert offsets.get(tp) == 117
        assert offsets[tp] == (117 if topic.endswith("-changelog") else None)
    assert ledger.latest(TP(BEHAVIOR.name, 0)) == (2, 117)
    assert ledger.latest(TP(BEHAVIOR.name, 1)) == (0, None)


def test_a_message_handed_out_before_a_rebalance_cannot_set_the_read_position() -> None:
    """Faust clears a revoked partition's read position; the message still in the fetcher's
    hands when the rebalance began stores its offset afterwards, and that store is left, so
    after the new assignment the records read again from the committed offset are not dropped
    as already read. The next message handed out stores its offset as usual."""
    ledger = SeekLedger()
    tp = TP("recstream-user-state-changelog", 1)
    offsets = ReadOffsets(ledger)
    offsets.handing_out(tp, ledger.count(tp))
    offsets[tp] = 339
    offsets.handing_out(tp, ledger.count(tp))  # record 340 goes out; its stream's queue is full
    offsets.revoked()
    offsets.pop(tp, None)  # Faust's on_partitions_revoked
    offsets[tp] = 340  # the fetcher, once the queue took record 340
    assert offsets[tp] is None
    offsets.handing_out(tp, ledger.count(tp))  # after the assignment: from the committed 318
    offsets[tp] = 318
    assert offsets[tp] == 318


def test_an_input_partition_stalled_past_its_commit_is_read_again(tmp_path: Path) -> None:
    """The worker's consumer reads an input partition again from its committed offset once it
    has had records past that offset for REFETCH_AFTER_S with none of them in an agent's hands
    and none acknowledged (they went missing before an agent took them); a partition with a
    message in hand, one read to its end, a changelog, and any partition during a rebalance
    are left alone, and an acknowledgement starts the wait again. (The broker's end offsets
    are given, as the consumer is not started.)"""
    app = create_app(Settings(data_dir=tmp_path), "all")
    consumer = app.consumer
    quiet, busy, done = (TP(BEHAVIOR.name, n) for n in range(3))
    changelog = TP("recstream-user-state-changelog", 0)
    consumer._owned = {quiet, busy, done, changelog}
    consumer._committed_offset.update({quiet: 117, busy: 50, done: 80, changelog: 3})
    ends = {quiet: 181, busy: 90, done: 80, changelog: 9}
    consumer.highwater = ends.__getitem__
    in_hand = Message(busy.topic, busy.partition, 50, TS / 1e3, 0, [], None, b"{}", None, tp=busy)
    consumer._unacked_messages.add(in_hand)
    start = 1000.0
    assert consumer._stalled(start) == []  # the wait starts
    assert consumer._stalled(start + REFETCH_AFTER_S - 1) == []
    assert consumer._stalled(start + REFETCH_AFTER_S) == [quiet]
    consumer._acked_at[quiet] = start + REFETCH_AFTER_S  # an acknowledgement
    assert consumer._stalled(start + REFETCH_AFTER_S + 1) == []
    assert consumer._stalled(start + 2 * REFETCH_AFTER_S) == [quiet]
    app.rebalancing = True
    assert consumer._stalled(start + 3 * REFETCH_AFTER_S) == []


def test_a_message_is_handed_over_in_place_unless_it_must_wait(tmp_path: Path) -> None:
    """With ``stream.direct_hand_over`` (off by default) the worker's fetch loop hands a
    message over without a task when Faust's delivery finishes in its first step; a delivery
    that must wait (its stream's queue full) goes on in Faust's ``wait_first``, from where it
    stopped, and ends when room is made, or is cancelled when flow is suspended (a rebalance),
    as Faust's own hand-over is; while flow is suspended nothing is stepped in place."""
    assert create_app(Settings(data_dir=tmp_path), "all").consumer.direct_hand_over is False
    tuned = Settings(data_dir=tmp_path / "tuned", stream={"direct_hand_over": True})
    app = create_app(tuned, "all")
    consumer = app.consumer
    assert consumer.direct_hand_over is True  # the setting turns the in-place loop on
    delivered: list[int] = []
    cancelled: list[int] = []

    async def at_once(n: int) -> None:
        delivered.append(n)

    async def into(queue: asyncio.Queue[object], n: int) -> None:
        try:
            await queue.put(n)
        except asyncio.CancelledError:
            cancelled.append(n)
            raise
        delivered.append(n)

    async def scenario() -> None:
        with mock.patch.object(consumer, "wait_first", side_effect=AssertionError("a task")):
            await consumer._hand_over(at_once(1))
        assert delivered == [1]

        queue: asyncio.Queue[object] = asyncio.Queue(maxsize=1)
        queue.put_nowait("full")
        waiting = asyncio.ensure_future(consumer._hand_over(into(queue, 2)))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        assert delivered == [1]
        assert queue.get_nowait() == "full"  # room
        await asyncio.wait_for(waiting, 5)
        assert delivered == [1, 2]
        assert queue.get_nowait() == 2

        queue.put_nowait("full")
        stuck = asyncio.ensure_future(consumer._hand_over(into(queue, 3)))
        await asyncio.sleep(0.05)
        consumer.suspend_flow.set()
        await asyncio.wait_for(stuck, 5)
        await asyncio.sleep(0)
        assert cancelled == [3]
        assert delivered == [1, 2]
        assert queue.qsize() == 1

        handed: list[object] = []

        def unstarted(*coros: Any) -> None:
            handed.extend(inspect.getcoroutinestate(c) for c in coros)
            for c in coros:
                c.close()

        with mock.patch.object(consumer, "wait_first", side_effect=unstarted):
            await consumer._hand_over(at_once(4))
        assert handed == ["CORO_CREATED", "CORO_CREATED"]  # to wait_first, neither stepped
        assert delivered == [1, 2]

    consumer.loop.run_until_complete(scenario())  # the loop Faust's events were made for


def test_paused_changelog_partitions_leave_the_fetch_requests(settings: Settings) -> None:
    """``pause_changelogs`` pauses in aiokafka the assigned partitions of the named topics that
    are listed as paused and resumes the others: on the embedded broker a record written to a
    paused changelog partition is not fetched while one on an input partition is, and once
    resumed the changelog record is fetched too."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition
    from confluent_kafka import Producer

    from streams.transport import _ConsumerThread

    changelog, source = "recstream-test-changelog", "recstream-test-input"
    specs = [TopicSpec(t, "key", "delete", False, "test") for t in (changelog, source)]
    provision_topics(settings.kafka, specs)
    producer = Producer(producer_config(settings.kafka))

    async def read_into(got: dict[str, int], consumer: Any, seconds: float, until: str) -> None:
        """Count the records fetched, by topic, for ``seconds`` or until ``until`` has some."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and until not in got:
            for tp, records in (await consumer.getmany(timeout_ms=100)).items():
                got[tp.topic] = got.get(tp.topic, 0) + len(records)

    async def scenario() -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka.bootstrap_servers,
            enable_auto_commit=False,
            fetch_max_wait_ms=20,
        )
        await consumer.start()
        try:
            tps = [TopicPartition(t, p) for t in (changelog, source) for p in range(2)]
            consumer.assign(tps)
            await consumer.seek_to_beginning()
            holder = SimpleNamespace(_consumer=consumer)
            paused = {(changelog, 0), (changelog, 1), (source, 1)}  # the input is not named
            _ConsumerThread.pause_changelogs(holder, {changelog}, paused)  # type: ignore[arg-type]
            assert consumer.paused() == {TopicPartition(changelog, 0), TopicPartition(changelog, 1)}
            for topic in (changelog, source):
                producer.produce(topic, key=b"k", value=topic.encode(), partition=0)
            producer.flush(10)
            got: dict[str, int] = {}
            await read_into(got, consumer, 3.0, until=changelog)
            assert got == {source: 1}  # the changelog record was not fetched
            assert TopicPartition(changelog, 0) not in consumer._fetcher._records
            _ConsumerThread.pause_changelogs(holder, {changelog}, set())  # type: ignore[arg-type]
            assert consumer.paused() == set()
            await read_into(got, consumer, 10.0, until=changelog)
            assert got == {source: 1, changelog: 1}
        finally:
            await consumer.stop()

    asyncio.run(scenario())


def test_the_worker_forwards_faust_pauses_of_changelog_partitions(tmp_path: Path) -> None:
    """Faust pauses partitions in its own books only; the worker's consumer hands the changelog
    partitions Faust holds paused, after every pause and resume, to its consumer thread (input
    partitions are left to Faust), in call order, on that thread's loop."""
    app = create_app(Settings(data_dir=tmp_path), "all")
    user_tables(app)
    consumer = app.consumer
    changelogs = set(app.tables.changelog_topics)
    assert len(changelogs) == 3  # user state, co-visitation, popularity
    log_topic = sorted(changelogs)[0]
    calls: list[tuple[set[str], set[tuple[str, int]]]] = []
    loop = asyncio.new_event_loop()
    consumer._thread = SimpleNamespace(
        thread_loop=loop, pause_changelogs=lambda topics, paused: calls.append((topics, paused))
    )
    try:
        log0, log1, source = TP(log_topic, 0), TP(log_topic, 1), TP(BEHAVIOR.name, 0)
        consumer.pause_partitions({log0, log1, source})
        consumer.resume_partitions({log1, source})
        consumer.pause_partitions({log1})
        loop.run_until_complete(asyncio.sleep(0))
    finally:
        loop.close()
    assert [paused for _, paused in calls] == [
        {(log_topic, 0), (log_topic, 1)},
        {(log_topic, 0)},
        {(log_topic, 0), (log_topic, 1)},
    ]
    assert all(topics == changelogs for topics, _ in calls)
