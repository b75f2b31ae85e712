"""The long-lived collaborators a worker builds once: vector store, encoder, recommender.

Each is created on first use, so a worker role only loads what its agents need (an ingest worker
never loads the encoder or opens the vector store).
"""

from __future__ import annotations

import time
from functools import cached_property
from pathlib import Path

import structlog

from infra.settings import Settings
from infra.vectors import VectorStore, open_vector_store
from infra.vectors.cached import CachedStore
from infra.vectors.edge import EdgeVectorStore
from infra.vectors.retry import RetryingStore
from models.encoder import EncoderLoadError, TextEncoder
from models.recommender import Recommender
from models.state import Fusion
from models.trained import TrainedModel, manifest_version

log = structlog.get_logger(__name__)


def index_items(store: VectorStore, items: str) -> None:
    """Build the HNSW index of the items collection of an embedded Qdrant Edge store.

    Edge has no background optimizer and its optimize holds the GIL for its whole run (about a
    second at 10,000 items, five minutes at a million; docs/vector-scale.md), so a worker does
    it once when it opens the store, before it consumes anything. Points written later are
    searched exactly until the next start. A Qdrant server indexes in the background itself.
    """
    if not isinstance(store, EdgeVectorStore):
        return
    start = time.perf_counter()
    changed = store.optimize(items)
    log.info(
        "items_indexed",
        collection=items,
        changed=changed,
        seconds=round(time.perf_counter() - start, 2),
    )


class Services:
    """Lazily built, shared by the agents of one worker process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @cached_property
    def _encoder(self) -> TextEncoder:
        return TextEncoder.from_settings(self.settings.encoder)

    def encoder(self) -> TextEncoder:
        return self._encoder

    @cached_property
    def _store(self) -> VectorStore:
        backend = open_vector_store(self.settings)
        vectors = self.settings.vectors
        # An unreachable store is waited for (backoff, bounded by Faust's buffer), not lost.
        store = RetryingStore(
            backend, max_wait_s=vectors.retry_max_wait_s, deadline_s=vectors.retry_deadline_s
        )
        dim = vectors.dim
        if "_encoder" in self.__dict__ and self._encoder.dim != dim:
            raise EncoderLoadError(
                f"the encoder makes {self._encoder.dim}-d vectors but the vector store is set to "
                f"{dim}-d; set RECSTREAM_VECTORS__DIM={self._encoder.dim}"
            )
        for name in (
            self.settings.vectors.items_collection,
            self.settings.vectors.reviews_collection,
        ):
            store.ensure_collection(name, dim)
        index_items(backend, vectors.items_collection)
        return CachedStore(
            store, vectors.items_collection, resident_max=vectors.resident_max_items or None
        )

    def store(self) -> VectorStore:
        return self._store

    @cached_property
    def _recommender(self) -> Recommender:
        s = self.settings
        model_dir = s.serving.model_dir
        return Recommender(
            self.store(),
            s.ranking,
            Fusion.untrained(s.ranking.behaviour_weight),
            s.vectors.items_collection,
            s.vectors.reviews_collection,
            model=self.load_model(model_dir) if model_dir is not None else None,
        )

    def recommender(self) -> Recommender:
        return self._recommender

    def load_model(self, path: Path) -> TrainedModel:
        """Load the trained model in ``path`` (a clear error if it is not a model directory)."""
        device = "cuda" if self.settings.encoder.device == "cuda" else "cpu"
        model = TrainedModel.load(path, device=device)
        log.info("model_loaded", version=model.version, path=str(path), device=device)
        return model

    def changed_model(self) -> TrainedModel | None:
        """The model now in the watched directory, if its version differs from the served one.

        A directory being replaced (no readable manifest) or a damaged model is skipped, and the
        served model stays; the next check tries again.
        """
        path = self.settings.serving.model_dir
        if path is None:
            return None
        version = manifest_version(path)
        if version is None or version == self._recommender.version:
            return None
        try:
            return self.load_model(path)
        except ValueError as exc:
            log.warning("model_not_loaded", path=str(path), error=str(exc))
            return None

    def model_version(self) -> str:
        """Names the ranker and the encoder that produced a list."""
        encoder = self._encoder.version if "_encoder" in self.__dict__ else "remote-encoder"
        return f"{self._recommender.version}+{encoder}"

    def close(self) -> None:
        if "_store" in self.__dict__:
            self._store.close()
        if "_encoder" in self.__dict__:
            self._encoder.close()  # its tokeniser processes, if it started any
