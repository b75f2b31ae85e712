"""The long-lived collaborators a worker builds once: vector store, encoder, recommender.

Each is created on first use, so a worker role only loads what its agents need (an ingest worker
never loads the encoder or opens the vector store).
"""

from __future__ import annotations

from functools import cached_property

from infra.settings import Settings
from infra.vectors import VectorStore, open_vector_store
from models.encoder import EncoderLoadError, TextEncoder
from models.recommender import Recommender
from models.state import Fusion


class Services:
    """Lazily built, shared by the agents of one worker process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @cached_property
    def _encoder(self) -> TextEncoder:
        enc = self.settings.encoder
        return TextEncoder(
            enc.model, device=enc.device, max_length=enc.max_length, batch_size=enc.batch_size
        )

    def encoder(self) -> TextEncoder:
        return self._encoder

    @cached_property
    def _store(self) -> VectorStore:
        store = open_vector_store(self.settings)
        dim = self.settings.vectors.dim
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
        return store

    def store(self) -> VectorStore:
        return self._store

    @cached_property
    def _recommender(self) -> Recommender:
        s = self.settings
        return Recommender(
            self.store(),
            s.ranking,
            Fusion.untrained(s.ranking.behaviour_weight),
            s.vectors.items_collection,
            s.vectors.reviews_collection,
        )

    def recommender(self) -> Recommender:
        return self._recommender

    def model_version(self) -> str:
        """Names the ranker and the encoder that produced a list."""
        encoder = self._encoder.version if "_encoder" in self.__dict__ else "remote-encoder"
        return f"{self._recommender.fusion.version}+{encoder}"

    def close(self) -> None:
        if "_store" in self.__dict__:
            self._store.close()
