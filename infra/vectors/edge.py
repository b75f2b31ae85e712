"""Qdrant Edge backend: each collection is one embedded shard in a sub-directory of ``path``.

Things about Qdrant Edge 0.9 this module relies on (see ``tests/test_vectors.py``):

- A shard is created once (``EdgeShard.create`` fails on a directory with segments) and opened
  with ``EdgeShard.load`` afterwards; an open shard holds a lock on its WAL, so one process at a
  time. ``close()`` flushes.
- Cosine scores come back as similarity (higher is better), as from a Qdrant server.
- ``MatchValue(True)`` is stored as the integer 1 by the bindings and then matches no boolean
  payload; a ``numpy.bool_`` reaches Rust as a real boolean, so booleans are passed that way.
- Nothing optimizes in the background: segments stay plain (exact, brute-force search) until
  :meth:`EdgeVectorStore.optimize` is called, which builds HNSW for segments over the indexing
  threshold.
- ``HnswIndexConfig`` needs ``m``, ``ef_construct`` and ``full_scan_threshold`` together; the HNSW
  settings are persisted with the shard when it is created, so they shape every later
  ``optimize()``. ``SearchParams(hnsw_ef=...)`` only matters for indexed segments above
  ``full_scan_threshold`` (smaller ones are searched exhaustively even when indexed); a query
  explores max(hnsw_ef, limit) candidates, and without ``hnsw_ef`` the index's ef_construct.
- Every error is a plain ``Exception``.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from infra.vectors import INDEXED_FIELDS, stored_payload, vector_list
from infra.vectors.base import Filter, Hit, VectorPoint, limits_for, point_id

if TYPE_CHECKING:
    import qdrant_edge

_COLLECTION_NAME = re.compile(r"[A-Za-z0-9_-]+")
_CONFIG_FILE = "edge_config.json"  # written by Edge into every shard directory
# Qdrant's own HNSW defaults, filled in for whichever of them a store leaves unset (Edge takes
# the three together); full_scan_threshold is in KB, as in Qdrant.
_HNSW_M = 16
_HNSW_EF_CONSTRUCT = 100
_HNSW_FULL_SCAN_THRESHOLD_KB = 10_000


class EdgeVectorStore:
    """:class:`~infra.vectors.base.VectorStore` on Qdrant Edge, embedded, persisted under ``path``.

    ``indexing_threshold_kb`` overrides Edge's segment size (in KB) above which :meth:`optimize`
    builds an HNSW index; ``hnsw_m`` (edges per node) and ``hnsw_ef_construct`` (candidates while
    building) shape that index. These three only apply to collections this store creates; a
    collection created earlier keeps the settings persisted with it. ``hnsw_ef`` is the number
    of candidates each query explores in an HNSW segment (at least the query's limit; None =
    the index's ef_construct); it applies to every query this store runs.
    """

    def __init__(
        self,
        path: Path,
        *,
        indexing_threshold_kb: int | None = None,
        hnsw_m: int | None = None,
        hnsw_ef_construct: int | None = None,
        hnsw_ef: int | None = None,
    ) -> None:
        import qdrant_edge  # noqa: F401 - fail fast when the worker extra is missing

        self._path = Path(path)
        self._indexing_threshold_kb = indexing_threshold_kb
        self._hnsw_m = hnsw_m
        self._hnsw_ef_construct = hnsw_ef_construct
        self._hnsw_ef = hnsw_ef
        self._shards: dict[str, qdrant_edge.EdgeShard] = {}
        self._keys: dict[int, str] = {}  # Edge point id (its UUID's int) -> our key

    def ensure_collection(self, name: str, dim: int) -> None:
        """Create the collection's shard if absent (cosine distance); a no-op when it exists."""
        directory = self._directory(name)
        persisted = _persisted_dim(directory)
        if persisted is not None and persisted != dim:
            raise ValueError(f"collection {name!r} holds {persisted}-d vectors, not {dim}-d")
        if persisted is None and name not in self._shards:
            self._shards[name] = self._create(directory, dim)
        _ensure_payload_indexes(self._shard(name))

    def upsert(self, collection: str, points: Sequence[VectorPoint]) -> None:
        """Insert or replace points by key (idempotent: same key, same point id)."""
        from qdrant_edge import Point, UpdateOperation

        if not points:
            return
        edge_points = [
            Point(point_id(p.key), vector_list(p.vector), stored_payload(p)) for p in points
        ]
        self._shard(collection).update(UpdateOperation.upsert_points(edge_points))

    def delete(self, collection: str, keys: Sequence[str]) -> None:
        """Delete points by key; unknown keys are ignored."""
        from qdrant_edge import UpdateOperation

        if not keys:
            return
        ids: list[qdrant_edge.PointId] = [point_id(key) for key in keys]
        self._shard(collection).update(UpdateOperation.delete_points(ids))

    def delete_where(self, collection: str, field_name: str, value: str) -> None:
        """Delete every point whose payload ``field_name`` equals ``value``."""
        from qdrant_edge import UpdateOperation

        condition = _edge_filter(Filter(must_equal={field_name: value}))
        if condition is not None:
            self._shard(collection).update(UpdateOperation.delete_points_by_filter(condition))

    def retrieve(
        self, collection: str, keys: Sequence[str], *, with_vectors: bool = True
    ) -> dict[str, VectorPoint]:
        """The stored points among ``keys``, by key; missing keys are simply absent."""
        ids: list[qdrant_edge.PointId] = list(dict.fromkeys(point_id(key) for key in keys))
        if not ids:
            return {}
        records = self._shard(collection).retrieve(ids, with_payload=True, with_vector=with_vectors)
        points = [_to_point(record, with_vectors=with_vectors) for record in records]
        return {point.key: point for point in points}

    def points_where(
        self, collection: str, field_name: str, value: str | bool, *, limit: int
    ) -> list[VectorPoint]:
        """At most ``limit`` points (with vectors) whose payload ``field_name`` equals ``value``."""
        from qdrant_edge import ScrollRequest

        condition = _edge_filter(Filter(must_equal={field_name: value}))
        records, _ = self._shard(collection).scroll(
            ScrollRequest(limit=limit, filter=condition, with_payload=True, with_vector=True)
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

        All vectors go to Edge as one ``QueryBatchRequest``, planned and scored together.
        """
        batches = self._query(collection, vectors, limit, flt, with_payload=True)
        return [[_to_hit(scored) for scored in batch] for batch in batches]

    def query_keys(
        self,
        collection: str,
        vectors: Sequence[np.ndarray],
        limit: int | Sequence[int],
        flt: Filter | None = None,
    ) -> list[dict[str, float]]:
        """Keys and scores per query, best first, read without payloads.

        Reading even one payload field costs Edge more than the search itself. Point ids are a
        pure function of keys, so each id is looked up once (by id, for its ``key``) and kept.
        """
        from qdrant_edge import PayloadSelector

        batches = self._query(collection, vectors, limit, flt, with_payload=False)
        keys = self._keys
        # Each ``.id`` access builds a uuid.UUID, whose hashing is Python code; its int is not.
        rows = [[(_id_int(scored.id), scored.score) for scored in batch] for batch in batches]
        unknown = list({i for row in rows for i, _ in row if i not in keys})
        if unknown:
            records = self._shard(collection).retrieve(
                [str(uuid.UUID(int=i)) for i in unknown], PayloadSelector.Include(["key"]), False
            )
            keys.update((_id_int(r.id), str((r.payload or {})["key"])) for r in records)
        return [{keys[i]: score for i, score in row} for row in rows]

    def _query(
        self,
        collection: str,
        vectors: Sequence[np.ndarray],
        limit: int | Sequence[int],
        flt: Filter | None,
        *,
        with_payload: bool,
    ) -> list[list[qdrant_edge.ScoredPoint]]:
        from qdrant_edge import Query, QueryBatchRequest, QueryRequest, SearchParams

        if not len(vectors):
            return []
        condition = _edge_filter(flt)
        params = SearchParams(hnsw_ef=self._hnsw_ef) if self._hnsw_ef is not None else None
        requests = [
            QueryRequest(
                limit=n,
                query=Query.Nearest(vector_list(vector)),
                filter=condition,
                with_payload=with_payload,
                params=params,
            )
            for vector, n in zip(vectors, limits_for(limit, len(vectors)), strict=True)
        ]
        return self._shard(collection).query_batch(QueryBatchRequest(requests))

    def count(self, collection: str) -> int:
        """How many points the collection holds."""
        from qdrant_edge import CountRequest

        return self._shard(collection).count(CountRequest(exact=True))

    def optimize(self, collection: str | None = None) -> bool:
        """Run Edge's optimizers (HNSW build, vacuum) on one or every open collection, blocking.

        True if any segment changed. Edge has no background optimizer, so call this after bulk
        loads; until then search stays exact over plain segments.
        """
        names = [collection] if collection is not None else list(self._shards)
        changed = [self._shard(name).optimize() for name in names]
        return any(changed)

    def close(self) -> None:
        """Flush and close every open shard; the store can be reopened at the same path."""
        shards, self._shards = self._shards, {}
        for shard in shards.values():
            shard.flush()
            shard.close()

    def _directory(self, name: str) -> Path:
        if not _COLLECTION_NAME.fullmatch(name):
            raise ValueError(f"collection name must match {_COLLECTION_NAME.pattern}: {name!r}")
        return self._path / name

    def _shard(self, name: str) -> qdrant_edge.EdgeShard:
        """The open shard of ``name``, loading it from disk on first use."""
        from qdrant_edge import EdgeShard

        shard = self._shards.get(name)
        if shard is None:
            directory = self._directory(name)
            if _persisted_dim(directory) is None:
                raise ValueError(f"collection {name!r} does not exist under {self._path}")
            shard = self._shards[name] = EdgeShard.load(str(directory))
        return shard

    def _create(self, directory: Path, dim: int) -> qdrant_edge.EdgeShard:
        from qdrant_edge import (
            Distance,
            EdgeConfig,
            EdgeOptimizersConfig,
            EdgeShard,
            EdgeVectorParams,
            HnswIndexConfig,
        )

        optimizers = None
        if self._indexing_threshold_kb is not None:
            optimizers = EdgeOptimizersConfig(indexing_threshold=self._indexing_threshold_kb)
        hnsw = None
        if self._hnsw_m is not None or self._hnsw_ef_construct is not None:
            hnsw = HnswIndexConfig(
                m=_HNSW_M if self._hnsw_m is None else self._hnsw_m,
                ef_construct=(
                    _HNSW_EF_CONSTRUCT
                    if self._hnsw_ef_construct is None
                    else self._hnsw_ef_construct
                ),
                full_scan_threshold=_HNSW_FULL_SCAN_THRESHOLD_KB,
            )
        vectors = EdgeVectorParams(size=dim, distance=Distance.Cosine)
        config = EdgeConfig(vectors=vectors, optimizers=optimizers, hnsw_config=hnsw)
        return EdgeShard.create(str(directory), config)


def _persisted_dim(directory: Path) -> int | None:
    """The vector size recorded in a shard directory, or None when no shard lives there."""
    config_file = directory / _CONFIG_FILE
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text(encoding="utf-8"))
    return int(config["vectors"][""]["size"])


def _ensure_payload_indexes(shard: qdrant_edge.EdgeShard) -> None:
    from qdrant_edge import PayloadSchemaType, UpdateOperation

    kinds = {"keyword": PayloadSchemaType.Keyword, "bool": PayloadSchemaType.Bool}
    existing = shard.info().payload_schema
    for field_name, kind in INDEXED_FIELDS.items():
        if field_name not in existing:
            shard.update(UpdateOperation.create_field_index(field_name, kinds[kind]))


def _edge_filter(flt: Filter | None) -> qdrant_edge.Filter | None:
    """Our filter as Edge's: payload equalities under ``must``, excluded ids under ``must_not``."""
    from qdrant_edge import (
        FieldCondition,
        HasIdCondition,
        MatchValue,
    )
    from qdrant_edge import Filter as EdgeFilter

    if flt is None or not (flt.must_equal or flt.exclude_keys):
        return None
    must: list[qdrant_edge.ConditionType] = [
        FieldCondition(name, match=MatchValue(_match_value(value)))
        for name, value in flt.must_equal.items()
    ]
    must_not: list[qdrant_edge.ConditionType] = []
    if flt.exclude_keys:
        must_not.append(HasIdCondition({point_id(key) for key in flt.exclude_keys}))
    return EdgeFilter(must=must or None, must_not=must_not or None)


def _match_value(value: str | bool | int) -> str | bool | int:
    # The bindings read a Python bool as an int (bool subclasses int), which then never matches
    # a boolean payload; numpy.bool_ is no int and arrives as a boolean.
    return np.bool_(value) if isinstance(value, bool) else value  # type: ignore[return-value]


def _to_point(record: qdrant_edge.Record, *, with_vectors: bool) -> VectorPoint:
    payload = dict(record.payload or {})
    vector = np.asarray(record.vector, dtype=np.float32) if with_vectors else None
    return VectorPoint(key=str(payload["key"]), vector=vector, payload=payload)


def _id_int(pid: qdrant_edge.PointId) -> int:
    """A point id as an int (Edge returns our UUID ids as ``uuid.UUID``)."""
    if isinstance(pid, uuid.UUID):
        return pid.int
    return pid if isinstance(pid, int) else uuid.UUID(pid).int


def _to_hit(scored: qdrant_edge.ScoredPoint) -> Hit:
    payload = dict(scored.payload or {})
    return Hit(key=str(payload["key"]), score=float(scored.score), payload=payload)
