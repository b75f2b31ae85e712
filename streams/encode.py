"""Encoder: consumes encode requests; upserts item and review vectors into the vector store, deletes
removed items, and emits ``review_embedded`` user updates. Items without catalogue text take their
reviews' profile (:mod:`models.profiles`) once the batch's reviews are stored.

Requests are micro-batched (size or wait time), coalesced per item (the latest version wins),
encoded and stored off the event loop. A text the encoder rejects alone is dead-lettered; the rest
go on.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from infra.vectors import VectorPoint, VectorStore, point_id
from models.encoder import TextEncoder
from models.profiles import REVIEWS, refresh_profiles, text_source
from models.state import SNIPPET_CHARS, review_key
from schemas.internal import EncodeRequest, UserUpdate
from schemas.topics import USER_UPDATES
from streams.observe import count_events, encoded
from streams.sinks import Output, Sinks, items_changed

if TYPE_CHECKING:
    from streams.services import Services

STEP = "encode-text"
log = structlog.get_logger(__name__)


def coalesce(requests: Sequence[EncodeRequest]) -> list[EncodeRequest]:
    """Keep the latest request per item (upsert or removal) and every review, in arrival order."""
    latest: dict[str, EncodeRequest] = {}
    for req in requests:
        key = review_key(req.event_id) if req.kind == "review" else f"item:{req.item_id}"
        latest.pop(key, None)
        latest[key] = req
    return list(latest.values())


def text_hash(version: str, text: str) -> str:
    """The content hash stored with each vector: the encoder's version and the text, so a text
    is encoded again only when it or the model changed."""
    return hashlib.sha256(f"{version}\0{text}".encode()).hexdigest()[:16]


def point_key(req: EncodeRequest) -> str:
    return review_key(req.event_id) if req.kind == "review" else req.item_id


def item_point(req: EncodeRequest, vector: np.ndarray | None, digest: str = "") -> VectorPoint:
    payload = {
        "title": req.title,
        "categories": req.categories,
        "available": req.available,
        "updated_ts": req.ts,
        "text_source": text_source(req.text, req.item_id),
        "reviews": 0,
        "text_hash": digest,
    }
    return VectorPoint(req.item_id, vector, payload)


def review_point(req: EncodeRequest, vector: np.ndarray, digest: str = "") -> VectorPoint:
    payload = {
        "user_id": req.user_id,
        "item_id": req.item_id,
        "rating": req.rating,
        "ts": req.ts,
        "text_hash": digest,
    }
    return VectorPoint(review_key(req.event_id), vector, payload)


def restamped(req: EncodeRequest, stored: VectorPoint) -> VectorPoint:
    """An unchanged item's stored vector (its text's, or its review profile) with the request's
    payload."""
    fresh = item_point(req, stored.vector)
    keep = {k: stored.payload[k] for k in ("text_source", "reviews", "text_hash")}
    return VectorPoint(req.item_id, stored.vector, {**fresh.payload, **keep})


def unchanged(
    store: VectorStore, collection: str, reqs: Sequence[EncodeRequest], digests: Sequence[str]
) -> dict[str, VectorPoint]:
    """The stored points, by key, whose text hash equals the request's: their vectors stand."""
    if not reqs:
        return {}
    stored = store.retrieve(collection, [point_key(r) for r in reqs])
    return {
        key: point
        for key, digest in zip((point_key(r) for r in reqs), digests, strict=True)
        if (point := stored.get(key)) is not None and point.payload.get("text_hash") == digest
    }


class EncodeStep:
    """The encode agent's work for one batch, kept apart from Faust so tests can drive it."""

    STEP = STEP

    def __init__(
        self,
        *,
        encoder: TextEncoder,
        store: VectorStore,
        items_collection: str,
        reviews_collection: str,
        sinks: Sinks,
        executor: Executor,
        partitions: int = 0,
    ) -> None:
        """``partitions``: how many partitions the user-updates topic has, for the notices that
        name changed items (0 sends none)."""
        self.encoder = encoder
        self.store = store
        self.items = items_collection
        self.reviews = reviews_collection
        self.sinks = sinks
        self.executor = executor
        self.partitions = partitions

    @classmethod
    def for_services(cls, services: Services, sinks: Sinks, executor: Executor) -> EncodeStep:
        """The step over a worker's (or a job's) encoder and vector store, on the configured
        collections."""
        vectors = services.settings.vectors
        return cls(
            encoder=services.encoder(),
            store=services.store(),
            items_collection=vectors.items_collection,
            reviews_collection=vectors.reviews_collection,
            sinks=sinks,
            executor=executor,
            partitions=services.settings.kafka.partitions,
        )

    async def _encode(self, texts: list[str]) -> np.ndarray:
        loop = asyncio.get_running_loop()
        vectors = await loop.run_in_executor(self.executor, self.encoder.encode, texts)
        encoded(len(texts))
        return vectors

    async def encode_each(
        self, reqs: list[EncodeRequest], messages: list[Any]
    ) -> tuple[list[EncodeRequest], np.ndarray]:
        """Encode the batch; if it fails, encode text by text and dead-letter the failures."""
        if not reqs:
            return [], np.zeros((0, self.encoder.dim), np.float32)
        texts = [r.text for r in reqs]
        try:
            return reqs, await self._encode(texts)
        except (RuntimeError, ValueError) as batch_exc:
            log.warning(
                "batch_encode_failed", step=STEP, size=len(reqs), error=type(batch_exc).__name__
            )
        ok, rows = [], []
        for i, text in enumerate(texts):
            try:
                rows.append((await self._encode([text]))[0])
                ok.append(i)
            except (RuntimeError, ValueError) as exc:
                self.sinks.dead(stage=STEP, message=messages[i], exc=exc)
        vectors = np.stack(rows) if rows else np.zeros((0, self.encoder.dim), np.float32)
        return [reqs[i] for i in ok], vectors

    async def run(
        self, batch: list[tuple[EncodeRequest, Any]], *, announce: bool = True
    ) -> dict[str, int]:
        """Store the batch's vectors. A text whose hash (text and encoder version) matches the
        stored point's is not encoded again: an item keeps its vector (or review profile) and
        takes the request's payload, a redelivered review stays as stored. ``announce`` sends
        each review's ``review_embedded`` update (a catalogue re-encode does not). Returns the
        counts of requests, texts encoded, failed (dead-lettered), unchanged and items removed."""
        by_id = {id(req): msg for req, msg in batch}
        reqs = coalesce([req for req, _ in batch])
        removed = [r.item_id for r in reqs if r.kind == "item_removed"]
        wanted = [r for r in reqs if r.kind != "item_removed"]
        digests = {id(r): text_hash(self.encoder.version, r.text) for r in wanted}
        # Store calls run on the executor: a store that is down retries there (RetryingStore),
        # and the event loop keeps heartbeating and buffering (bounded) meanwhile.
        loop = asyncio.get_running_loop()
        kept_items, kept_reviews = await loop.run_in_executor(
            self.executor, self._unchanged_both, wanted, digests
        )
        to_encode = [
            r
            for r in wanted
            if point_key(r) not in (kept_items if r.kind == "item" else kept_reviews)
        ]
        done, vectors = await self.encode_each(to_encode, [by_id[id(r)] for r in to_encode])
        items = [
            item_point(r, v, digests[id(r)])
            for r, v in zip(done, vectors, strict=True)
            if r.kind == "item"
        ]
        items += [
            restamped(r, kept_items[r.item_id])
            for r in wanted
            if r.kind == "item" and r.item_id in kept_items
        ]
        reviews = [
            review_point(r, v, digests[id(r)])
            for r, v in zip(done, vectors, strict=True)
            if r.kind == "review"
        ]
        described = await loop.run_in_executor(self.executor, self._write, items, reviews, removed)
        if announce:  # a redelivered review is announced again: the first may have been lost
            stored = {point_key(r) for r in done} | set(kept_reviews)
            for r in wanted:
                if r.kind == "review" and point_key(r) in stored:
                    self._announce_review(r)
        if reqs:
            changed = [p.key for p in items] + described + removed  # recommend workers cache
            self.sinks.send_all(items_changed(changed, partitions=self.partitions, origin=reqs[0]))
        summary = {
            "requests": len(batch),
            "encoded": len(done),
            "failed": len(to_encode) - len(done),
            "unchanged": len(kept_items) + len(kept_reviews),
            "removed": len(removed),
        }
        log.debug("encoded", step=STEP, **summary)
        return summary

    def _unchanged(
        self, collection: str, reqs: list[EncodeRequest], digests: dict[int, str]
    ) -> dict[str, VectorPoint]:
        return unchanged(self.store, collection, reqs, [digests[id(r)] for r in reqs])

    def _unchanged_both(
        self, wanted: list[EncodeRequest], digests: dict[int, str]
    ) -> tuple[dict[str, VectorPoint], dict[str, VectorPoint]]:
        """The unchanged items and reviews among ``wanted`` (store reads, off the loop)."""
        items = self._unchanged(self.items, [r for r in wanted if r.kind == "item"], digests)
        reviews = self._unchanged(self.reviews, [r for r in wanted if r.kind == "review"], digests)
        return items, reviews

    def _write(
        self, items: list[VectorPoint], reviews: list[VectorPoint], removed: list[str]
    ) -> list[str]:
        """Store the batch's points, rebuild the review profiles they touch and delete removed
        items (store writes, off the loop); return the items whose profile was rebuilt."""
        if items:
            self.store.upsert(self.items, items)
        if reviews:
            self.store.upsert(self.reviews, reviews)
        described = [p.key for p in items if p.payload["text_source"] == REVIEWS]
        described += [str(p.payload["item_id"]) for p in reviews]
        if described:
            refresh_profiles(self.store, self.items, self.reviews, described)
        if removed:
            self.store.delete(self.items, removed)
        return described

    def _announce_review(self, req: EncodeRequest) -> None:
        update = UserUpdate(
            event_id=req.event_id,
            ts=req.ts,
            received_ms=req.received_ms,
            kind="review_embedded",
            user_id=req.user_id or "",
            event_type="review",
            item_id=req.item_id,
            review_point=review_key(req.event_id),
            review_snippet=req.text[:SNIPPET_CHARS],
        )
        self.sinks.send(
            Output(USER_UPDATES, update.user_id, update.model_dump_json(exclude_none=True).encode())
        )


async def encode_text(
    stream: Any, *, step: EncodeStep, batch_size: int, batch_wait_s: float
) -> None:
    """Micro-batch encode requests and hand each batch to :class:`EncodeStep`."""
    async for events in stream.take_events(batch_size, within=batch_wait_s):
        count_events(STEP, events)
        batch = step.sinks.parse(events, EncodeRequest, stage=STEP)
        if batch:
            await step.run(batch)


__all__ = ["EncodeStep", "encode_text", "point_id", "review_key"]
