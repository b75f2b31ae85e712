"""Items without catalogue text described by their reviews: the maths, the stream's encode and
forget steps over Qdrant Edge with the real encoder, and evaluation's no-future-text rule."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from infra.settings import RankingSettings
from infra.vectors import VectorPoint
from infra.vectors.edge import EdgeVectorStore
from models.encoder import TextEncoder
from models.evaluation.baselines import Ranker, Request, TextKnn
from models.evaluation.data import Interaction
from models.evaluation.protocols import run_prequential
from models.profiles import (
    CATALOGUE,
    PROFILE_REVIEWS,
    REVIEWS,
    ProfileBook,
    refresh_profiles,
    review_profile,
    text_source,
    with_profiles,
)
from models.recommender import Recommender
from models.state import Fusion
from schemas.internal import EncodeRequest, UserUpdate
from schemas.topics import ENCODE_REQUESTS, RECOMMENDATIONS, USER_UPDATES
from streams.encode import EncodeStep
from streams.sinks import Sinks
from streams.user_state import Tables, UserStateStep

TS = 1_700_000_000_000
DIM = 4


def _unit(values: list[float]) -> np.ndarray:
    v = np.asarray(values, dtype=np.float32)
    return v / np.linalg.norm(v)


class _Topic:
    """Records what a step sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, bytes]] = []

    def send_soon(self, *, key: bytes, value: bytes, partition: int | None = None) -> None:
        self.sent.append((key, value))


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder(device="cpu")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EdgeVectorStore]:
    s = EdgeVectorStore(tmp_path / "qdrant")
    yield s
    s.close()


# --- the maths ------------------------------------------------------------------------------------


def test_text_source_is_reviews_only_for_an_item_whose_text_is_its_id() -> None:
    """An ASIN-only item (or an empty text) is described by reviews; any real text is catalogue."""
    assert text_source("B0002E1G5C", "B0002E1G5C") == REVIEWS
    assert text_source("  ", "B0002E1G5C") == REVIEWS
    assert text_source("B0002E1G5C. Guitar strings", "B0002E1G5C") == CATALOGUE
    assert text_source("Nylon guitar strings", "i1") == CATALOGUE


def test_review_profile_is_the_unit_mean_and_none_without_reviews() -> None:
    """The profile of (1,0,0,0) and (0,1,0,0) is (1,1,0,0)/sqrt 2; none for no review or for two
    reviews that cancel out."""
    got = review_profile([_unit([1, 0, 0, 0]), _unit([0, 1, 0, 0])])
    assert got is not None
    np.testing.assert_allclose(got, [2**-0.5, 2**-0.5, 0, 0], atol=1e-7)
    assert review_profile([]) is None
    assert review_profile([_unit([1, 0, 0, 0]), _unit([-1, 0, 0, 0])]) is None


def test_profile_book_skips_catalogue_items_counts_a_review_once_and_stops_at_the_limit() -> None:
    """Only textless items get profiles; a review added twice counts once; past the limit the
    profile stops changing."""
    book = ProfileBook(["t"])
    assert book.add("c", "r0", _unit([1, 0, 0, 0])) is None
    first = book.add("t", "r1", _unit([1, 0, 0, 0]))
    again = book.add("t", "r1", _unit([1, 0, 0, 0]))
    np.testing.assert_allclose(first, again)
    assert book.count("t") == 1
    for n in range(PROFILE_REVIEWS - 1):
        book.add("t", f"x{n}", _unit([0, 1, 0, 0]))
    assert book.count("t") == PROFILE_REVIEWS
    assert book.add("t", "late", _unit([0, 0, 1, 0])) is None
    assert book.count("t") == PROFILE_REVIEWS


def test_with_profiles_replaces_only_textless_rows_that_have_reviews() -> None:
    """Rows of catalogue items and of textless items without reviews keep their vectors."""
    vectors = np.eye(DIM, dtype=np.float32)[:3]
    out = with_profiles(
        ["a", "b", "c"],
        vectors,
        {"b", "c"},
        [("a", "r1", _unit([0, 0, 0, 1])), ("b", "r2", _unit([0, 0, 1, 1]))],
    )
    np.testing.assert_allclose(out[0], vectors[0])
    np.testing.assert_allclose(out[1], _unit([0, 0, 1, 1]), atol=1e-7)
    np.testing.assert_allclose(out[2], vectors[2])
    np.testing.assert_allclose(vectors, np.eye(DIM, dtype=np.float32)[:3])  # input untouched


def test_refresh_profiles_reads_the_stored_reviews_and_reports_items_left_without(
    store: EdgeVectorStore,
) -> None:
    """Over Qdrant Edge: the textless item's vector becomes its stored reviews' unit mean with the
    count in its payload; the catalogue item is untouched; once its reviews are deleted the
    textless item is reported bare."""
    store.ensure_collection("items", DIM)
    store.ensure_collection("reviews", DIM)
    store.upsert(
        "items",
        [
            VectorPoint("t", _unit([1, 0, 0, 0]), {"title": "t", "text_source": REVIEWS}),
            VectorPoint("c", _unit([0, 0, 0, 1]), {"title": "C", "text_source": CATALOGUE}),
        ],
    )
    store.upsert(
        "reviews",
        [
            VectorPoint("r1", _unit([0, 1, 0, 0]), {"user_id": "u1", "item_id": "t"}),
            VectorPoint("r2", _unit([0, 0, 1, 0]), {"user_id": "u2", "item_id": "t"}),
            VectorPoint("r3", _unit([0, 1, 1, 0]), {"user_id": "u1", "item_id": "c"}),
        ],
    )
    assert refresh_profiles(store, "items", "reviews", ["t", "c", "missing"]) == []
    got = store.retrieve("items", ["t", "c"])
    np.testing.assert_allclose(got["t"].vector, _unit([0, 1, 1, 0]), atol=1e-6)
    assert (got["t"].payload["reviews"], got["t"].payload["title"]) == (2, "t")
    np.testing.assert_allclose(got["c"].vector, _unit([0, 0, 0, 1]), atol=1e-6)
    store.delete("reviews", ["r1", "r2"])
    assert [p.key for p in refresh_profiles(store, "items", "reviews", ["t"])] == ["t"]


# --- the stream -----------------------------------------------------------------------------------


def _encode_step(store: EdgeVectorStore, encoder: TextEncoder, topics: dict) -> EncodeStep:
    store.ensure_collection("items", encoder.dim)
    store.ensure_collection("reviews", encoder.dim)
    return EncodeStep(
        encoder=encoder,
        store=store,
        items_collection="items",
        reviews_collection="reviews",
        sinks=Sinks(topics),
        executor=ThreadPoolExecutor(1),
    )


def _request(event_id: str, kind: str, item: str, text: str, user: str | None = None):
    req = EncodeRequest(
        event_id=event_id,
        ts=TS,
        received_ms=TS,
        kind=kind,  # type: ignore[arg-type]
        item_id=item,
        user_id=user,
        text=text,
        title=item if kind == "item" else "",
    )
    return req, None


REVIEW_A = "Bright strings that stay in tune for weeks. Great for acoustic guitar."
REVIEW_B = "These picks grip well and do not slip, medium gauge is perfect for strumming."


def test_encode_step_describes_a_textless_item_by_its_reviews_and_leaves_a_titled_one(
    store: EdgeVectorStore, encoder: TextEncoder
) -> None:
    """With the real MiniLM encoder: after the items' batch and a batch of two reviews, the
    ASIN-only item's stored vector is the unit mean of the two reviews' vectors, while the item
    with a catalogue text keeps the encoding of its text although it was reviewed too."""
    step = _encode_step(store, encoder, {USER_UPDATES.name: _Topic()})
    asyncio.run(
        step.run(
            [
                _request("e1", "item", "B000ASIN01", "B000ASIN01"),
                _request("e2", "item", "titled", "Nylon strings for classical guitar"),
            ]
        )
    )
    before = store.retrieve("items", ["B000ASIN01"])["B000ASIN01"]
    assert (before.payload["text_source"], before.payload["reviews"]) == (REVIEWS, 0)
    np.testing.assert_allclose(before.vector, encoder.encode(["B000ASIN01"])[0], atol=1e-5)
    asyncio.run(
        step.run(
            [
                _request("e3", "review", "B000ASIN01", REVIEW_A, "u1"),
                _request("e4", "review", "B000ASIN01", REVIEW_B, "u2"),
                _request("e5", "review", "titled", REVIEW_A, "u1"),
            ]
        )
    )
    a, b = encoder.encode([REVIEW_A, REVIEW_B])
    after = store.retrieve("items", ["B000ASIN01", "titled"])
    np.testing.assert_allclose(
        after["B000ASIN01"].vector, (a + b) / np.linalg.norm(a + b), atol=1e-5
    )
    assert after["B000ASIN01"].payload["reviews"] == 2
    assert after["titled"].payload["text_source"] == CATALOGUE
    np.testing.assert_allclose(
        after["titled"].vector,
        encoder.encode(["Nylon strings for classical guitar"])[0],
        atol=1e-5,
    )


def test_forget_rebuilds_profiles_without_the_users_reviews_and_reencodes_a_bare_item(
    store: EdgeVectorStore, encoder: TextEncoder
) -> None:
    """Forgetting u1 takes u1's review out of the shared item's profile (it becomes u2's review
    alone) and sends the item only u1 reviewed back to the encoder for its own text, which the
    encode step then stores: no trace of u1's text stays in any item vector."""
    step = _encode_step(store, encoder, {USER_UPDATES.name: _Topic()})
    asyncio.run(
        step.run(
            [
                _request("e1", "item", "B000SHARED", "B000SHARED"),
                _request("e2", "item", "B000ALONE1", "B000ALONE1"),
            ]
        )
    )
    asyncio.run(
        step.run(
            [
                _request("e3", "review", "B000SHARED", REVIEW_A, "u1"),
                _request("e4", "review", "B000SHARED", REVIEW_B, "u2"),
                _request("e5", "review", "B000ALONE1", REVIEW_A, "u1"),
            ]
        )
    )
    encode_topic, recs = _Topic(), _Topic()
    cfg = RankingSettings(k=5)
    users = UserStateStep(
        tables=Tables(users={}, covisit={}, popularity={}),
        recommender=Recommender(
            store, cfg, Fusion.untrained(cfg.behaviour_weight), "items", "reviews"
        ),
        store=store,
        reviews_collection="reviews",
        sinks=Sinks({ENCODE_REQUESTS.name: encode_topic, RECOMMENDATIONS.name: recs}),
        model_version="test@1",
        max_recent=50,
    )
    forget = UserUpdate(
        event_id="f1", ts=TS, received_ms=TS, kind="forget", user_id="u1", event_type="forget_user"
    )
    users.run([forget])
    _, b = encoder.encode([REVIEW_A, REVIEW_B])
    shared = store.retrieve("items", ["B000SHARED"])["B000SHARED"]
    np.testing.assert_allclose(shared.vector, b, atol=1e-5)
    assert shared.payload["reviews"] == 1
    assert [key for key, _ in encode_topic.sent] == [b"B000ALONE1"]
    request = EncodeRequest.model_validate_json(encode_topic.sent[0][1])
    assert (request.kind, request.item_id, request.text) == ("item", "B000ALONE1", "B000ALONE1")
    asyncio.run(step.run([(request, None)]))
    alone = store.retrieve("items", ["B000ALONE1"])["B000ALONE1"]
    np.testing.assert_allclose(alone.vector, encoder.encode(["B000ALONE1"])[0], atol=1e-5)
    assert store.points_where("reviews", "user_id", "u1", limit=10) == []


# --- evaluation -----------------------------------------------------------------------------------


def _inter(user: str, item: str, kind: str, ts: int, event_id: str) -> Interaction:
    return Interaction(user, item, kind, ts, event_id, None, "text" if kind == "review" else None)


def test_prequential_textknn_sees_only_reviews_written_before_each_target(tmp_path: Path) -> None:
    """Walking u1: buy x, review x; u2: buy t (textless), review t; u1: buy t. When u1's target t
    is scored, t's vector is u2's review (written before), so textknn ranks t first for u1 (whose
    history x points the same way); u3's later review of t never reaches that list."""
    ids = ["x", "t", "y"]
    vectors = np.stack([_unit([0, 1, 0, 0]), _unit([1, 0, 0, 0]), _unit([0.2, 1, 0.9, 0])])
    reviews = {
        "rx": ("u1", _unit([0, 1, 0, 0])),
        "rt2": ("u2", _unit([0, 1, 0, 0])),
        "rt3": ("u3", _unit([0, 0, 0, 1])),
    }
    log = [
        _inter("u1", "x", "purchase", 1, "px"),
        _inter("u1", "x", "review", 1, "rx"),
        _inter("u2", "t", "purchase", 2, "pt2"),
        _inter("u2", "t", "review", 2, "rt2"),
        _inter("u1", "t", "purchase", 3, "pt1"),
        _inter("u3", "t", "purchase", 4, "pt3"),
        _inter("u3", "t", "review", 4, "rt3"),
    ]
    from models.evaluation.data import Dataset

    by_user: dict[str, list[Interaction]] = {}
    for inter in log:
        by_user.setdefault(inter.user_id, []).append(inter)
    data = Dataset("tiny", {i: i for i in ids}, {i: i for i in ids}, log, by_user)
    knn = TextKnn(ids, vectors, last=1, reviews=reviews, textless={"t", "x"})
    [run], _ = run_prequential(data, [knn], k=1)
    assert (run.targets, run.lists) == (["t"], [["t"]])
    np.testing.assert_allclose(knn.vectors[1], _unit([0, 1, 0, 1]), atol=1e-7)  # u3's came later
    fresh = TextKnn(ids, vectors, last=1, reviews=reviews, textless={"t", "x"})
    assert fresh.recommend([Request("u1", [[log[0]]], {"x"})], 1) == [["y"]]  # t not yet reviewed


def test_eval_ranker_stores_the_profile_of_the_reviews_it_observes(tmp_path: Path) -> None:
    """The production ranker under evaluation writes a textless item's profile into its Qdrant
    Edge store as it observes reviews (a repeat step included), counting each review once."""
    ids = ["t", "c"]
    vectors = np.stack([_unit([1, 0, 0, 0]), _unit([0, 0, 0, 1])])
    reviews = {"r1": ("u1", _unit([0, 1, 0, 0])), "r2": ("u2", _unit([0, 0, 1, 0]))}
    ranker = Ranker.build(
        tmp_path / "ranker",
        item_ids=ids,
        item_vectors=vectors,
        titles={},
        reviews=reviews,
        ranking=RankingSettings(k=2),
        fusion=Fusion.untrained(0.7),
        textless={"t"},
    )
    ranker.observe(
        "u1", [_inter("u1", "t", "purchase", 1, "p1"), _inter("u1", "t", "review", 1, "r1")]
    )
    ranker.observe("u2", [_inter("u2", "t", "purchase", 2, "p2")])
    ranker.repeat("u2", [_inter("u2", "t", "review", 2, "r2")])
    ranker.repeat("u2", [_inter("u2", "t", "review", 2, "r2")])
    store = ranker.recommender.store
    got = store.retrieve("items", ids)
    np.testing.assert_allclose(got["t"].vector, _unit([0, 1, 1, 0]), atol=1e-6)
    assert (got["t"].payload["reviews"], got["t"].payload["text_source"]) == (2, REVIEWS)
    np.testing.assert_allclose(got["c"].vector, _unit([0, 0, 0, 1]), atol=1e-6)
    store.close()


class _Counting:
    """The real encoder, counting the texts it is asked to encode."""

    def __init__(self, encoder: TextEncoder) -> None:
        self.inner, self.texts = encoder, []
        self.dim, self.version = encoder.dim, encoder.version

    def encode(self, texts: list[str]) -> np.ndarray:
        self.texts.extend(texts)
        return self.inner.encode(texts)


def test_unchanged_text_is_not_encoded_again_but_its_payload_is_updated(
    store: EdgeVectorStore, encoder: TextEncoder
) -> None:
    """An item sent again with the same text keeps its vector without encoding (its new title
    is stored), a changed text is encoded, a redelivered review is not encoded again but is
    announced again, and a new encoder version re-encodes everything."""
    counting = _Counting(encoder)
    updates = _Topic()
    step = _encode_step(store, counting, {USER_UPDATES.name: updates})  # type: ignore[arg-type]
    first = [
        _request("e1", "item", "i1", "Nylon strings for classical guitar"),
        _request("e2", "review", "i1", REVIEW_A, "u1"),
    ]
    asyncio.run(step.run(first))
    assert len(counting.texts) == 2
    vector = store.retrieve("items", ["i1"])["i1"].vector
    retitled = EncodeRequest.model_validate({**first[0][0].model_dump(), "title": "New title"})
    asyncio.run(step.run([(retitled, None), first[1]]))
    assert len(counting.texts) == 2  # nothing encoded
    stored = store.retrieve("items", ["i1"])["i1"]
    assert stored.payload["title"] == "New title"
    np.testing.assert_array_equal(stored.vector, vector)
    assert len(updates.sent) == 2  # the review announced on both deliveries
    asyncio.run(step.run([_request("e3", "item", "i1", "Steel strings for electric guitar")]))
    assert counting.texts[2:] == ["Steel strings for electric guitar"]
    counting.version = "another-model@00000000"
    asyncio.run(step.run(first))
    assert counting.texts[3:] == ["Nylon strings for classical guitar", REVIEW_A]


def test_a_profiled_item_is_encoded_again_when_its_text_comes_back(
    store: EdgeVectorStore, encoder: TextEncoder
) -> None:
    """An item described by reviews holds a profile, not its text's vector, so the same text
    sent again (as forget does for an item left without reviews) is encoded, not skipped."""
    counting = _Counting(encoder)
    step = _encode_step(store, counting, {USER_UPDATES.name: _Topic()})  # type: ignore[arg-type]
    asyncio.run(step.run([_request("e1", "item", "B000ASIN01", "B000ASIN01")]))
    asyncio.run(step.run([_request("e2", "review", "B000ASIN01", REVIEW_A, "u1")]))
    assert store.retrieve("items", ["B000ASIN01"])["B000ASIN01"].payload["text_hash"] == ""
    asyncio.run(step.run([_request("e3", "item", "B000ASIN01", "B000ASIN01")]))
    assert counting.texts.count("B000ASIN01") == 2


def test_the_encode_agent_takes_no_new_batch_while_one_is_encoding(
    store: EdgeVectorStore, encoder: TextEncoder
) -> None:
    """Back-pressure: while the encode step works on a batch the agent pulls nothing more from
    the stream, so a slow encoder leaves messages in Faust's bounded buffer (which then pauses
    fetching) instead of growing memory; once the batch is done the next one is taken."""
    from types import SimpleNamespace

    from streams.encode import encode_text

    step = _encode_step(store, encoder, {USER_UPDATES.name: _Topic()})
    release, pulled, running = asyncio.Event(), [], []
    real_run = step.run

    async def slow_run(batch, **kwargs):  # type: ignore[no-untyped-def]
        running.append(len(batch))
        await release.wait()
        return await real_run(batch, **kwargs)

    step.run = slow_run  # type: ignore[method-assign]

    def message(n: int) -> SimpleNamespace:
        req, _ = _request(f"e{n}", "item", f"i{n}", f"item number {n}")
        value = req.model_dump_json().encode()
        return SimpleNamespace(message=SimpleNamespace(topic=ENCODE_REQUESTS.name, value=value))

    class Stream:
        async def take_events(self, size: int, within: float):  # type: ignore[no-untyped-def]
            for start in (0, 2, 4):
                pulled.append(start)
                yield [message(start + n) for n in range(size)]

    async def scenario() -> None:
        agent = asyncio.create_task(encode_text(Stream(), step=step, batch_size=2, batch_wait_s=0))
        for _ in range(20):
            await asyncio.sleep(0.01)
        assert (pulled, running) == ([0], [2])
        release.set()
        await agent

    asyncio.run(scenario())
    assert pulled == [0, 2, 4]
    assert store.count("items") == 6
