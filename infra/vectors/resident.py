"""Exact search over a collection's available points, held in memory as one float32 matrix.

The ranker asks for about a hundred candidates per list. Qdrant Edge answers from plain segments
by an exhaustive scan that holds the GIL, and its binding then builds a ``uuid.UUID`` for every
returned id; for a catalogue of tens of thousands of items one matrix product over the vectors in
memory is several times cheaper, exact, and numpy runs it without the GIL, so the event loop goes
on meanwhile (``docs/performance.md``). Past ``max_items`` available points the index switches
itself off and the store's own (HNSW) search answers.

Coherence follows :class:`~infra.vectors.cached.CachedStore`'s: a key written, deleted or
announced as changed is marked, and the next query first reads the marked keys back from the
store; :meth:`ResidentIndex.reset` (after a rebalance, or a delete by filter) makes the next query
load the whole collection again.

Threads: marks come from the event loop, queries from the ranking thread. Marking takes only a
short lock of its own, never the one a query holds while it multiplies.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from infra.vectors.base import VectorPoint, VectorStore

#: The payload equality a point must meet to be held (the ranker's candidate filter).
AVAILABLE = {"available": True}
_MIN_ROWS = 1024  # initial capacity, and the fewest dead rows worth compacting


def _held(point: VectorPoint | None) -> bool:
    """Whether a stored point meets the filter the index answers (as the stores match it)."""
    return point is not None and point.vector is not None and point.payload.get("available") is True


@dataclass(frozen=True, slots=True)
class ResidentView:
    """The held points while :meth:`ResidentIndex.view` holds the index: row ``r`` of
    ``matrix`` is the unit vector of ``keys[r]``; rows listed in ``dead`` hold nothing."""

    matrix: np.ndarray
    rows: Mapping[str, int]
    keys: Sequence[str | None]
    dead: np.ndarray
    collection: str

    def key(self, row: int) -> str:
        """The key held in a live ``row``."""
        key = self.keys[row]
        if key is None:
            raise KeyError(f"row {row} of {self.collection!r} holds nothing")
        return key

    def scores(self, vectors: Sequence[np.ndarray]) -> np.ndarray:
        """Cosines of each query with every row, (queries, rows) float32; dead rows -inf."""
        queries = np.asarray(np.stack(vectors), dtype=np.float32)
        if queries.shape[1] != self.matrix.shape[1]:
            raise ValueError(
                f"{queries.shape[1]}-d query for {self.matrix.shape[1]}-d {self.collection!r}"
            )
        norms = np.linalg.norm(queries, axis=1, keepdims=True)
        norms[norms == 0] = 1.0
        queries = queries / norms  # float32 throughout: no copy of the matrix in float64
        scores = queries @ self.matrix.T  # numpy drops the GIL for the product
        if len(self.dead):
            scores[:, self.dead] = -np.inf
        return scores

    def top(self, row_scores: np.ndarray, limit: int) -> np.ndarray:
        """The rows of the ``limit`` best live scores, best first (ties in row order)."""
        n = min(limit, len(self.rows))
        if n <= 0:
            return np.zeros(0, np.intp)
        total = len(row_scores)
        if n < total:
            picked = np.argpartition(row_scores, total - n)[total - n :]
        else:
            picked = np.arange(total)
        return picked[np.argsort(-row_scores[picked], kind="stable")][:n]


class ResidentIndex:
    """The available points of ``collection`` in ``store``, searched exactly by cosine."""

    def __init__(self, store: VectorStore, collection: str, *, max_items: int) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, not {max_items}")
        self.store = store
        self.collection = collection
        self.max_items = max_items
        self.active = True  # False while the collection holds more than max_items
        self._lock = threading.Lock()  # held by a query or a sync
        self._marks_lock = threading.Lock()  # held only to add or take marks
        self._marked: set[str] = set()
        self._stale = True  # load everything on the next query
        self._clear()

    def __len__(self) -> int:
        return len(self._rows)

    def mark(self, keys: Iterable[str]) -> None:
        """``keys`` were written, deleted or announced: read them again before the next query."""
        with self._marks_lock:
            self._marked.update(keys)

    def reset(self) -> None:
        """Load the whole collection again before the next query."""
        with self._marks_lock:
            self._stale = True

    @contextmanager
    def view(self) -> Iterator[ResidentView | None]:
        """The held points, brought up to date, for as long as the block runs (None while the
        index is off). Queries from other threads wait; marks do not."""
        with self._lock:
            self._sync()
            if not self.active:
                yield None
                return
            yield ResidentView(
                self._mat[: self._n], self._rows, self._keys, self._dead_indices(), self.collection
            )

    def query(
        self, vectors: Sequence[np.ndarray], limits: Sequence[int]
    ) -> list[dict[str, float]] | None:
        """Per query, the ``limit`` most similar held points as ``{key: cosine}``, best first;
        None while the index is off (too many points), for the caller to ask the store."""
        with self.view() as view:
            if view is None:
                return None
            out: list[dict[str, float]] = [{} for _ in vectors]
            if not view.rows or not len(vectors):
                return out
            scores = view.scores(vectors)
            for q, limit in enumerate(limits):
                order = view.top(scores[q], limit)
                out[q] = dict(
                    zip([view.keys[i] for i in order], scores[q, order].tolist(), strict=True)
                )
            return out

    # -- keeping the matrix in step with the store ---------------------------------------------

    def _sync(self) -> None:
        with self._marks_lock:
            marked, self._marked = self._marked, set()
            stale, self._stale = self._stale, False
        if stale:
            self._load()
        elif marked and self.active:
            found = self.store.retrieve(self.collection, sorted(marked))
            for key in marked:
                point = found.get(key)
                if _held(point):
                    self._put(point)  # type: ignore[arg-type]
                else:
                    self._drop(key)
            if len(self._rows) > self.max_items:
                self._switch_off()
            elif self._dead >= _MIN_ROWS and self._dead * 2 > self._n:
                self._compact()

    def _load(self) -> None:
        points = self.store.points_where(
            self.collection, "available", True, limit=self.max_items + 1
        )
        self._clear()
        held = [p for p in points if _held(p)]
        if len(held) > self.max_items:
            self._switch_off()
            return
        self.active = True
        for point in held:
            self._put(point)

    def _switch_off(self) -> None:
        """Too many points to hold: drop the matrix; the next reset tries again."""
        self._clear()
        self.active = False

    def _clear(self) -> None:
        self._mat = np.zeros((0, 0), np.float32)  # rows [0, _n) used; unit vectors
        self._keys: list[str | None] = []  # per row; None once the row is dead
        self._rows: dict[str, int] = {}
        self._n = 0
        self._dead = 0
        self._dead_rows: np.ndarray | None = np.zeros(0, np.intp)  # None: recompute

    def _put(self, point: VectorPoint) -> None:
        vector = np.asarray(point.vector, dtype=np.float32).ravel()
        norm = float(np.linalg.norm(vector))
        if norm > 0:
            vector = vector / norm
        row = self._rows.get(point.key)
        if row is None:
            if self._n == self._mat.shape[0] or self._mat.shape[1] != len(vector):
                self._grow(len(vector))
            row = self._n
            self._n += 1
            self._keys.append(point.key)
            self._rows[point.key] = row
        self._mat[row] = vector

    def _drop(self, key: str) -> None:
        row = self._rows.pop(key, None)
        if row is not None:
            self._keys[row] = None
            self._dead += 1
            self._dead_rows = None

    def _grow(self, dim: int) -> None:
        if self._mat.shape[1] not in (0, dim) and self._rows:
            raise ValueError(f"{dim}-d point in {self._mat.shape[1]}-d {self.collection!r}")
        rows = max(_MIN_ROWS, 2 * self._mat.shape[0])
        grown = np.zeros((rows, dim), np.float32)
        if self._mat.shape[1] == dim:
            grown[: self._n] = self._mat[: self._n]
        self._mat = grown

    def _compact(self) -> None:
        live = [(key, row) for row, key in enumerate(self._keys) if key is not None]
        keep = np.array([row for _, row in live], dtype=np.intp)
        mat = np.zeros((max(_MIN_ROWS, 2 * len(live)), self._mat.shape[1]), np.float32)
        mat[: len(live)] = self._mat[keep]
        self._mat = mat
        self._keys = [key for key, _ in live]
        self._rows = {key: n for n, (key, _) in enumerate(live)}
        self._n, self._dead = len(live), 0
        self._dead_rows = np.zeros(0, np.intp)

    def _dead_indices(self) -> np.ndarray:
        if self._dead_rows is None:
            self._dead_rows = np.array(
                [row for row, key in enumerate(self._keys) if key is None], dtype=np.intp
            )
        return self._dead_rows
