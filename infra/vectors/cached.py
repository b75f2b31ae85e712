"""A vector store that keeps one collection's points in memory, for the ranker's reads.

Every list the recommend step builds reads the vectors and titles of the user's history items and
of about a hundred candidates. Read from the store each time, converting those records was most of
the worker's time (``docs/performance.md``); served from memory it is a dictionary lookup.

Coherence:

- writes made through this store (the encode step and forget in the same process, evaluation)
  drop the written keys, so the next read fetches them again;
- writes made by another process (an encoder worker beside a Qdrant server) are announced on the
  user-updates topic as ``items_changed`` notices, and the recommend step calls :meth:`invalidate`;
- a key the store does not hold is remembered as absent until it is written or announced.

The table holds at most ``capacity`` keys; past that the oldest-cached half is dropped.

With ``resident_max`` set, the collection's available points are also held as one matrix
(:class:`~infra.vectors.resident.ResidentIndex`) and the candidate queries (``available`` true)
are answered from it exactly, without the store, while the collection holds at most that many;
the same writes, notices and :meth:`CachedStore.clear` keep it coherent.

Threads: the worker ranks on an executor thread while the event loop applies notices, so reads
and invalidations may interleave. Each dictionary operation is atomic; a read that fetched a
point just before another write may keep that older point until the write's notice arrives.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from infra.vectors.base import Filter, Hit, VectorPoint, VectorStore, limits_for
from infra.vectors.resident import AVAILABLE, ResidentIndex

DEFAULT_CAPACITY = 200_000
_UNKNOWN = object()  # not held (a held None means the store has no such point)


class CachedStore:
    """:class:`~infra.vectors.base.VectorStore` over ``inner`` that caches ``collection``'s points.

    Reads of other collections go straight to ``inner``, and so does every query that the
    resident index (``resident_max`` points at most; None: no index) does not answer.
    """

    def __init__(
        self,
        inner: VectorStore,
        collection: str,
        *,
        capacity: int = DEFAULT_CAPACITY,
        resident_max: int | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {capacity}")
        self.inner = inner
        self.collection = collection
        self.capacity = capacity
        self.resident = (
            ResidentIndex(inner, collection, max_items=resident_max) if resident_max else None
        )
        self._held: dict[str, VectorPoint | None] = {}
        self.hits = 0
        self.misses = 0

    # -- the cache -------------------------------------------------------------------------------

    def invalidate(self, keys: Iterable[str]) -> None:
        """Forget ``keys``: their next read goes to the store."""
        keys = list(keys)
        for key in keys:
            self._held.pop(key, None)
        if self.resident is not None:
            self.resident.mark(keys)

    def clear(self) -> None:
        """Forget every key (after a rebalance, when notices may have been missed)."""
        self._held.clear()
        if self.resident is not None:
            self.resident.reset()

    def __len__(self) -> int:
        return len(self._held)

    def _read(self, keys: Sequence[str]) -> dict[str, VectorPoint]:
        held = self._held
        points: dict[str, VectorPoint | None] = {}
        missing = []
        for key in dict.fromkeys(keys):
            point = held.get(key, _UNKNOWN)  # one lookup: the loop may invalidate meanwhile
            if point is _UNKNOWN:
                missing.append(key)
            else:
                points[key] = point  # type: ignore[assignment]
        self.misses += len(missing)
        self.hits += len(points)
        if missing:
            found = self.inner.retrieve(self.collection, missing)
            overflow = len(held) + len(missing) - self.capacity
            if overflow > 0:  # drop the oldest-cached half (or more, for a huge read); pop, as
                for old in list(held)[: max(len(held) // 2, overflow)]:  # the event loop may
                    held.pop(old, None)  # invalidate while the ranking thread reads
            for key in missing:
                points[key] = held[key] = found.get(key)
        return {k: p for k in keys if (p := points.get(k)) is not None}

    # -- the VectorStore interface ---------------------------------------------------------------

    def ensure_collection(self, name: str, dim: int) -> None:
        self.inner.ensure_collection(name, dim)

    def upsert(self, collection: str, points: Sequence[VectorPoint]) -> None:
        self.inner.upsert(collection, points)
        if collection == self.collection:
            self.invalidate(p.key for p in points)

    def delete(self, collection: str, keys: Sequence[str]) -> None:
        self.inner.delete(collection, keys)
        if collection == self.collection:
            self.invalidate(keys)

    def delete_where(self, collection: str, field_name: str, value: str) -> None:
        self.inner.delete_where(collection, field_name, value)
        if collection == self.collection:
            self.clear()

    def retrieve(
        self, collection: str, keys: Sequence[str], *, with_vectors: bool = True
    ) -> dict[str, VectorPoint]:
        if collection != self.collection:
            return self.inner.retrieve(collection, keys, with_vectors=with_vectors)
        points = self._read(keys)
        if with_vectors:
            return points
        return {k: VectorPoint(p.key, None, p.payload) for k, p in points.items()}

    def points_where(
        self, collection: str, field_name: str, value: str | bool, *, limit: int
    ) -> list[VectorPoint]:
        return self.inner.points_where(collection, field_name, value, limit=limit)

    def query_batch(
        self,
        collection: str,
        vectors: Sequence[np.ndarray],
        limit: int,
        flt: Filter | None = None,
    ) -> list[list[Hit]]:
        return self.inner.query_batch(collection, vectors, limit, flt)

    def query_keys(
        self,
        collection: str,
        vectors: Sequence[np.ndarray],
        limit: int | Sequence[int],
        flt: Filter | None = None,
    ) -> list[dict[str, float]]:
        index = self.resident
        if (
            index is not None
            and collection == self.collection
            and flt is not None
            and dict(flt.must_equal) == AVAILABLE
            and not flt.exclude_keys
        ):
            found = index.query(vectors, limits_for(limit, len(vectors)))
            if found is not None:
                return found
        return self.inner.query_keys(collection, vectors, limit, flt)

    def count(self, collection: str) -> int:
        return self.inner.count(collection)

    def close(self) -> None:
        self.clear()
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        # Backend extras (Edge's ``optimize``) pass through.
        return getattr(self.inner, name)
