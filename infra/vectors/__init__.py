"""Vector stores: the interface, its plain-data types, and the factory that picks a backend.

``open_vector_store`` returns Qdrant Edge embedded under the data directory unless a Qdrant server
URL is configured. Neither ``qdrant_edge`` nor ``qdrant_client`` is imported here: a client-only
install has neither, and the backend modules import them only when a store is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

import numpy as np

from infra.vectors.base import Filter, Hit, Payload, VectorPoint, VectorStore, point_id

if TYPE_CHECKING:
    from infra.settings import Settings

__all__ = [
    "INDEXED_FIELDS",
    "Filter",
    "Hit",
    "Payload",
    "VectorPoint",
    "VectorStore",
    "open_vector_store",
    "point_id",
    "stored_payload",
    "vector_list",
]

# Payload fields both backends index when they create a collection: the ones we filter on.
INDEXED_FIELDS: Mapping[str, Literal["keyword", "bool"]] = {
    "user_id": "keyword",
    "item_id": "keyword",
    "available": "bool",
}


def stored_payload(point: VectorPoint) -> Payload:
    """The payload a backend stores for ``point``: its own payload plus our key under ``key``."""
    stated = point.payload.get("key", point.key)
    if stated != point.key:
        raise ValueError(f"payload key {stated!r} differs from point key {point.key!r}")
    return {**point.payload, "key": point.key}


def vector_list(vector: np.ndarray | None) -> list[float]:
    """A float32 vector as the plain list both Qdrant APIs accept; None is an error."""
    if vector is None:
        raise ValueError("a point or query needs a vector")
    return np.asarray(vector, dtype=np.float32).ravel().tolist()


def open_vector_store(settings: Settings) -> VectorStore:
    """The configured store: a Qdrant server when ``vectors.url`` is set, else Edge on disk."""
    vectors = settings.vectors
    if vectors.url:
        from infra.vectors.server import QdrantServerStore

        api_key = vectors.api_key.get_secret_value() if vectors.api_key is not None else None
        return QdrantServerStore.from_url(vectors.url, api_key=api_key, tls_ca=vectors.tls_ca)
    from infra.vectors.edge import EdgeVectorStore

    return EdgeVectorStore(
        settings.vectors_dir,
        hnsw_m=vectors.hnsw_m,
        hnsw_ef_construct=vectors.hnsw_ef_construct,
        hnsw_ef=vectors.hnsw_ef,
    )
