"""Encoder: consumes encode requests; upserts item and review vectors into the vector store, deletes
removed items, and emits ``review_embedded`` user updates. Items without catalogue text take their
reviews' profile (:mod:`models.profiles`) once the batch's reviews are stored.

Requests are micro-batched (size or wait time), coalesced per item (the latest version wins) and
encoded off the event loop. A text the encoder rejects alone is dead-lettered; the rest go on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Any

import numpy as np
import structlog
from pydantic import ValidationError

from infra.vectors import VectorPoint, VectorStore, point_id
from models.encoder import TextEncoder
from models.profiles import REVIEWS, refresh_profiles, text_source
from models.state import SNIPPET_CHARS, review_key
from schemas.internal import EncodeRequest, UserUpdate
from schemas.topics import USER_UPDATES
from streams.sinks import Output, Sinks

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


def item_point(req: EncodeRequest, vector: np.ndarray) -> VectorPoint:
    payload = {
        "title": req.title,
        "categories": req.categories,
        "available": req.available,
        "updated_ts": req.ts,
        "text_source": text_source(req.text, req.item_id),
        "reviews": 0,
    }
    return VectorPoint(req.item_id, vector, payload)


def review_point(req: EncodeRequest, vector: np.ndarray) -> VectorPoint:
    payload = {"user_id": req.user_id, "item_id": req.item_id, "rating": req.rating, "ts": req.ts}
    return VectorPoint(review_key(req.event_id), vector, payload)


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
    ) -> None:
        self.encoder = encoder
        self.store = store
        self.items = items_collection
        self.reviews = reviews_collection
        self.sinks = sinks
        self.executor = executor

    async def _encode(self, texts: list[str]) -> np.ndarray:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self.encoder.encode, texts)

    async def encode_each(
        self, reqs: list[EncodeRequest], messages: list[Any]
    ) -> tuple[list[EncodeRequest], np.ndarray]:
        """Encode the batch; if it fails, encode text by text and dead-letter the failures."""
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

    async def run(self, batch: list[tuple[EncodeRequest, Any]]) -> None:
        by_id = {id(req): msg for req, msg in batch}
        reqs = coalesce([req for req, _ in batch])
        removed = [r.item_id for r in reqs if r.kind == "item_removed"]
        to_encode = [r for r in reqs if r.kind != "item_removed"]
        if to_encode:
            done, vectors = await self.encode_each(to_encode, [by_id[id(r)] for r in to_encode])
            items = [
                item_point(r, v) for r, v in zip(done, vectors, strict=True) if r.kind == "item"
            ]
            reviews = [
                review_point(r, v) for r, v in zip(done, vectors, strict=True) if r.kind == "review"
            ]
            if items:
                self.store.upsert(self.items, items)
            if reviews:
                self.store.upsert(self.reviews, reviews)
            described = [p.key for p in items if p.payload["text_source"] == REVIEWS]
            described += [str(p.payload["item_id"]) for p in reviews]
            if described:
                refresh_profiles(self.store, self.items, self.reviews, described)
            for r in (r for r in done if r.kind == "review"):
                self._announce_review(r)
        if removed:
            self.store.delete(self.items, removed)
        log.debug(
            "encoded", step=STEP, requests=len(batch), encoded=len(to_encode), removed=len(removed)
        )

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
        batch = []
        for event in events:
            try:
                batch.append(
                    (EncodeRequest.model_validate_json(event.message.value), event.message)
                )
            except ValidationError as exc:
                step.sinks.dead(stage=STEP, message=event.message, exc=exc)
        if batch:
            await step.run(batch)


__all__ = ["EncodeStep", "encode_text", "point_id", "review_key"]
