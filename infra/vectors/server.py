"""Qdrant server backend through qdrant-client; its local mode (``:memory:`` or a path) is the
test double that the congruence tests hold to the same cases as Qdrant Edge.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from infra.vectors import INDEXED_FIELDS, stored_payload, vector_list
from infra.vectors.base import Filter, Hit, VectorPoint, limits_for, point_id

if TYPE_CHECKING:
    from qdrant_client import QdrantClient, models


class QdrantServerStore:
    """:class:`~infra.vectors.base.VectorStore` on a Qdrant server (or qdrant-client local mode)."""

    def __init__(self, client: QdrantClient) -> None:
        self._client = client

    @classmethod
    def from_url(
        cls,
        url: str,
        api_key: str | None = None,
        *,
        timeout: int | None = None,
        tls_ca: Path | None = None,
    ) -> QdrantServerStore:
        """A store talking to the Qdrant server at ``url`` (REST), authenticated by ``api_key``.

        ``tls_ca``: a CA bundle to trust for an ``https`` URL whose certificate a private CA
        signed (instead of the system's trust store). qdrant-client's background version check
        uses the system store only, so it is skipped then rather than warn about a failure.
        """
        import ssl

        from qdrant_client import QdrantClient

        if tls_ca is None:
            return cls(QdrantClient(url=url, api_key=api_key, timeout=timeout))
        if not Path(tls_ca).is_file():
            raise FileNotFoundError(f"Qdrant CA bundle not found: {tls_ca}")
        verify = ssl.create_default_context(cafile=str(tls_ca))
        client = QdrantClient(
            url=url, api_key=api_key, timeout=timeout, verify=verify, check_compatibility=False
        )
        return cls(client)

    def ensure_collection(self, name: str, dim: int) -> None:
        """Create the collection if absent (cosine distance) and index the filtered fields."""
        from qdrant_client import models

        if self._client.collection_exists(name):
            self._check_dim(name, dim)
            return
        self._client.create_collection(
            name, vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE)
        )
        kinds = {"keyword": models.PayloadSchemaType.KEYWORD, "bool": models.PayloadSchemaType.BOOL}
        for field_name, kind in INDEXED_FIELDS.items():
            self._client.create_payload_index(name, field_name, kinds[kind], wait=True)

    def upsert(self, collection: str, points: Sequence[VectorPoint]) -> None:
        """Insert or replace points by key (idempotent: same key, same point id)."""
        from qdrant_client import models

        if not points:
            return
        structs = [
            models.PointStruct(
                id=point_id(p.key), vector=vector_list(p.vector), payload=stored_payload(p)
            )
            for p in points
        ]
        self._client.upsert(collection, points=structs, wait=True)

    def delete(self, collection: str, keys: Sequence[str]) -> None:
        """Delete points by key; unknown keys are ignored."""
        from qdrant_client import models

        if not keys:
            return
        ids: list[models.ExtendedPointId] = [point_id(key) for key in keys]
        self._client.delete(collection, points_selector=models.PointIdsList(points=ids), wait=True)

    def delete_where(self, collection: str, field_name: str, value: str) -> None:
        """Delete every point whose payload ``field_name`` equals ``value``."""
        from qdrant_client import models

        condition = _client_filter(Filter(must_equal={field_name: value}))
        if condition is not None:
            selector = models.FilterSelector(filter=condition)
            self._client.delete(collection, points_selector=selector, wait=True)

    def retrieve(
        self, collection: str, keys: Sequence[str], *, with_vectors: bool = True
    ) -> dict[str, VectorPoint]:
        """The stored points among ``keys``, by key; missing keys are simply absent."""
        ids: list[models.ExtendedPointId] = list(dict.fromkeys(point_id(key) for key in keys))
        if not ids:
            return {}
        records = self._client.retrieve(
            collection, ids, with_payload=True, with_vectors=with_vectors
        )
        points = [_to_point(record, with_vectors=with_vectors) for record in records]
        return {point.key: point for point in points}

    def points_where(
        self, collection: str, field_name: str, value: str | bool, *, limit: int
    ) -> list[VectorPoint]:
        """At most ``limit`` points (with vectors) whose payload ``field_name`` equals ``value``."""
        records, _ = self._client.scroll(
            collection,
            scroll_filter=_client_filter(Filter(must_equal={field_name: value})),
            limit=limit,
            with_payload=True,
            with_vectors=True,
        )
        return [_to_point(record, with_vectors=True) for record in records]

    def query_batch(
        self,
        collection: str,
        vectors: Sequence[np.ndarray],
        limit: int,
        flt: Filter | None = None,
    ) -> list[list[Hit]]:
        """For each query vector, the ``limit`` most similar points (best first) meeting ``flt``.

        All vectors go in one ``query_batch_points`` call (one round trip).
        """
        responses = self._query(collection, vectors, limit, flt, True)
        return [[_to_hit(scored) for scored in response.points] for response in responses]

    def query_keys(
        self,
        collection: str,
        vectors: Sequence[np.ndarray],
        limit: int | Sequence[int],
        flt: Filter | None = None,
    ) -> list[dict[str, float]]:
        """Keys and scores per query, best first; only the ``key`` payload field is fetched."""
        responses = self._query(collection, vectors, limit, flt, ["key"])
        return [
            {str((s.payload or {})["key"]): float(s.score) for s in response.points}
            for response in responses
        ]

    def _query(
        self,
        collection: str,
        vectors: Sequence[np.ndarray],
        limit: int | Sequence[int],
        flt: Filter | None,
        with_payload: bool | list[str],
    ) -> list[Any]:
        from qdrant_client import models

        if not len(vectors):
            return []
        condition = _client_filter(flt)
        requests = [
            models.QueryRequest(
                query=vector_list(vector), filter=condition, limit=n, with_payload=with_payload
            )
            for vector, n in zip(vectors, limits_for(limit, len(vectors)), strict=True)
        ]
        return self._client.query_batch_points(collection, requests=requests)

    def count(self, collection: str) -> int:
        """How many points the collection holds."""
        return self._client.count(collection, exact=True).count

    def close(self) -> None:
        """Close the client's connections (local mode: flush and release its files)."""
        self._client.close()

    def _check_dim(self, name: str, dim: int) -> None:
        from qdrant_client import models

        params = self._client.get_collection(name).config.params.vectors
        if isinstance(params, models.VectorParams) and params.size != dim:
            raise ValueError(f"collection {name!r} holds {params.size}-d vectors, not {dim}-d")


def _client_filter(flt: Filter | None) -> models.Filter | None:
    """Our filter as qdrant-client's: equalities under ``must``, excluded ids under ``must_not``."""
    from qdrant_client import models

    if flt is None or not (flt.must_equal or flt.exclude_keys):
        return None
    must: list[models.Condition] = [
        models.FieldCondition(key=name, match=models.MatchValue(value=value))
        for name, value in flt.must_equal.items()
    ]
    must_not: list[models.Condition] = []
    if flt.exclude_keys:
        ids: list[models.ExtendedPointId] = [point_id(key) for key in flt.exclude_keys]
        must_not.append(models.HasIdCondition(has_id=ids))
    return models.Filter(must=must or None, must_not=must_not or None)


def _to_point(record: models.Record, *, with_vectors: bool) -> VectorPoint:
    payload = dict(record.payload or {})
    vector = np.asarray(record.vector, dtype=np.float32) if with_vectors else None
    return VectorPoint(key=str(payload["key"]), vector=vector, payload=payload)


def _to_hit(scored: models.ScoredPoint) -> Hit:
    payload = dict(scored.payload or {})
    return Hit(key=str(payload["key"]), score=float(scored.score), payload=payload)
