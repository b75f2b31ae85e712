"""The one small vector-store interface recstream needs, and its plain-data types.

Two backends implement it: Qdrant Edge embedded in the process (the default) and qdrant-client
against a Qdrant server (whose local mode is the test double). Congruence tests run the same
cases on both. Ids are our string ids; backends map them to deterministic Qdrant point ids with
:func:`point_id`.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

_NAMESPACE = uuid.UUID("6f1c1c52-7f8e-4d7e-9a0b-2f4f5b9d7c11")

Payload = dict[str, Any]


def limits_for(limit: int | Sequence[int], count: int) -> list[int]:
    """One result limit per query: ``limit`` repeated, or the given list (checked for length)."""
    if isinstance(limit, int):
        return [limit] * count
    out = list(limit)
    if len(out) != count:
        raise ValueError(f"{len(out)} limits for {count} queries")
    return out


def point_id(key: str) -> str:
    """The deterministic Qdrant point id (a UUID string) for one of our string keys."""
    return str(uuid.uuid5(_NAMESPACE, key))


@dataclass(frozen=True, slots=True)
class VectorPoint:
    """A stored point: our key, its vector (L2-normalised float32) and its payload."""

    key: str
    vector: np.ndarray | None
    payload: Payload = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Hit:
    """A query result: key, cosine similarity and payload."""

    key: str
    score: float
    payload: Payload


@dataclass(frozen=True, slots=True)
class Filter:
    """Conditions a point must meet: payload equalities, and keys it must not be."""

    must_equal: Mapping[str, str | bool | int] = field(default_factory=dict)
    exclude_keys: Sequence[str] = ()


class VectorStore(Protocol):
    """Collections of cosine-distance vectors with payloads; each key is in ``payload['key']``."""

    def ensure_collection(self, name: str, dim: int) -> None:
        """Create the collection if absent (cosine distance); a no-op when it exists."""

    def upsert(self, collection: str, points: Sequence[VectorPoint]) -> None:
        """Insert or replace points by key (idempotent: same key, same point id)."""

    def delete(self, collection: str, keys: Sequence[str]) -> None:
        """Delete points by key; unknown keys are ignored."""

    def delete_where(self, collection: str, field_name: str, value: str) -> None:
        """Delete every point whose payload ``field_name`` equals ``value``."""

    def retrieve(
        self, collection: str, keys: Sequence[str], *, with_vectors: bool = True
    ) -> dict[str, VectorPoint]:
        """The stored points among ``keys``, by key; missing keys are simply absent."""

    def points_where(
        self, collection: str, field_name: str, value: str | bool, *, limit: int
    ) -> list[VectorPoint]:
        """At most ``limit`` points (with vectors) whose payload ``field_name`` equals ``value``,
        in point-id order, so the same stored set always gives the same answer."""

    def query_batch(
        self,
        collection: str,
        vectors: Sequence[np.ndarray],
        limit: int,
        flt: Filter | None = None,
    ) -> list[list[Hit]]:
        """For each query vector, the ``limit`` most similar points (best first) meeting ``flt``."""

    def query_keys(
        self,
        collection: str,
        vectors: Sequence[np.ndarray],
        limit: int | Sequence[int],
        flt: Filter | None = None,
    ) -> list[dict[str, float]]:
        """:meth:`query_batch` as ``{key: score}`` per query, best first, without payloads: for a
        caller that keeps its own item table and needs only keys and scores. ``limit`` may be
        one per query."""

    def count(self, collection: str) -> int:
        """How many points the collection holds."""

    def close(self) -> None:
        """Flush and release resources."""
