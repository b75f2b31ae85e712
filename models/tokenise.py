"""Batch tokenisation for the encoder, in-process or in worker processes.

The Rust tokenizer holds the GIL while it works, so threads cannot tokenise side by side; a GPU
encoder that tokenised in its own process would wait on one core. :class:`TokeniserPool` runs
the same tokenizer in a few worker processes (spawned, so they import only this module, numpy and
tokenizers) and hands back padded numpy arrays. The encoder keeps a bounded number of batches in
flight, so memory stays bounded however long the input.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

PAD_MULTIPLE = 8


@dataclass(frozen=True)
class TokeniserSpec:
    """All a process needs to rebuild the model's tokenizer: its JSON and the padding rules."""

    tokenizer_json: str
    max_length: int
    pad_id: int
    pad_token: str
    pad_type_id: int
    with_types: bool  # whether the model takes token_type_ids

    @classmethod
    def of(cls, tokenizer: Any, max_length: int) -> TokeniserSpec:
        """From a transformers fast tokenizer."""
        return cls(
            tokenizer.backend_tokenizer.to_str(),
            max_length,
            int(tokenizer.pad_token_id),
            str(tokenizer.pad_token),
            int(tokenizer.pad_token_type_id),
            "token_type_ids" in tokenizer.model_input_names,
        )

    def build(self) -> Any:
        """A Rust tokenizer that truncates to ``max_length`` and pads a batch to its longest text,
        rounded up to a multiple of 8 (what the transformers wrapper does with ``padding=True,
        truncation=True``)."""
        from tokenizers import Tokenizer

        fast = Tokenizer.from_str(self.tokenizer_json)
        fast.enable_truncation(self.max_length)
        fast.enable_padding(
            pad_id=self.pad_id,
            pad_token=self.pad_token,
            pad_type_id=self.pad_type_id,
            pad_to_multiple_of=PAD_MULTIPLE,
        )
        return fast


def arrays(fast: Any, texts: list[str], with_types: bool) -> dict[str, np.ndarray]:
    """The model inputs of one batch as int64 arrays of shape (texts, padded length)."""
    encodings = fast.encode_batch_fast(texts)
    out = {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
    }
    if with_types:
        out["token_type_ids"] = np.array([e.type_ids for e in encodings], dtype=np.int64)
    return out


def joined(parts: list[dict[str, np.ndarray]], spec: TokeniserSpec) -> dict[str, np.ndarray]:
    """Batches tokenised apart, stacked into one padded to the widest of them."""
    if len(parts) == 1:
        return parts[0]
    width = max(part["input_ids"].shape[1] for part in parts)
    fill = {"input_ids": spec.pad_id, "attention_mask": 0, "token_type_ids": spec.pad_type_id}
    return {
        key: np.concatenate(
            [
                np.pad(p[key], ((0, 0), (0, width - p[key].shape[1])), constant_values=fill[key])
                for p in parts
            ]
        )
        for key in parts[0]
    }


_WORKER: dict[str, Any] = {}  # this worker process's tokenizer


def _start_worker(spec: TokeniserSpec) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process
    _WORKER.update(fast=spec.build(), with_types=spec.with_types)


def _tokenise_in_worker(texts: list[str]) -> dict[str, np.ndarray]:
    return arrays(_WORKER["fast"], texts, _WORKER["with_types"])


class TokeniserPool:
    """``workers`` processes tokenising in parallel; :meth:`submit` returns a future of a chunk's
    arrays. A GPU batch is tokenised as several chunks of ``CHUNK`` texts, so even a single large
    batch spreads over every worker."""

    CHUNK = 64

    def __init__(self, spec: TokeniserSpec, workers: int) -> None:
        self.workers = workers
        self._pool = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(spec,),
        )

    def submit(self, texts: list[str]) -> Future[dict[str, np.ndarray]]:
        return self._pool.submit(_tokenise_in_worker, texts)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def default_workers(device: str) -> int:
    """Tokeniser processes for ``device``: none on the CPU (the model needs the cores), and all
    cores but two (at most 16) beside a GPU."""
    if device != "cuda":
        return 0
    return max(1, min(16, (os.cpu_count() or 1) - 2))
