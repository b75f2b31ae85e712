"""Batch tokenisation for the encoder, in-process or in worker processes.

:class:`Tokeniser` gives the Rust tokenizer's ids, with a fast path for plain ASCII text of a
BERT-style WordPiece tokenizer (:class:`AsciiWordPiece`). A batch leaves it in compact form (ids
in 16 bits where the vocabulary fits, lengths instead of a mask), which :func:`model_inputs`
expands wherever the model runs, on the GPU for a GPU.

Beside a GPU, one core cannot tokenise as fast as the model encodes, and the Rust tokenizer holds
the GIL while it works, so threads cannot tokenise side by side. :class:`TokeniserPool` runs the
tokeniser in a few worker processes (spawned, so they import only this module, numpy, structlog
and tokenizers). The encoder keeps a bounded number of chunks in flight, so memory stays bounded
however long the input.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
import structlog

log = structlog.get_logger(__name__)

PAD_MULTIPLE = 8


@dataclass(frozen=True)
class TokeniserSpec:
    """All a process needs to rebuild the model's tokeniser: the tokenizer's JSON and the padding
    rules."""

    tokenizer_json: str
    max_length: int
    pad_id: int
    pad_type_id: int
    with_types: bool  # whether the model takes token_type_ids

    @classmethod
    def of(cls, tokenizer: Any, max_length: int) -> TokeniserSpec:
        """From a transformers fast tokenizer."""
        return cls(
            tokenizer.backend_tokenizer.to_str(),
            max_length,
            int(tokenizer.pad_token_id),
            int(tokenizer.pad_token_type_id),
            "token_type_ids" in tokenizer.model_input_names,
        )


class Tokeniser:
    """A batch of texts -> the model's inputs in compact form, the ids the Rust tokenizer gives.

    The Rust tokenizer keeps each character's offsets through normalisation and splitting, which
    the encoder never reads. For a BERT-style WordPiece tokenizer (BERT normaliser and
    pre-tokenizer), texts of printable ASCII take a shorter path (:class:`AsciiWordPiece`); any
    other text, and every text of any other tokenizer, goes through the Rust tokenizer. At 128
    tokens one core of the 2-core development VM tokenised about 35,000 texts/s on the short path
    and 6,000 with the Rust tokenizer alone (``benchmarks/encoder.py`` measures both).
    """

    def __init__(self, spec: TokeniserSpec) -> None:
        from tokenizers import Tokenizer

        self.spec = spec
        self._rust = Tokenizer.from_str(spec.tokenizer_json)
        self._rust.no_padding()
        self._rust.enable_truncation(spec.max_length)
        self.fast = AsciiWordPiece.of(self._rust, spec.max_length)
        vocab = self._rust.get_vocab_size(with_added_tokens=True)
        self.id_type = np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.int32

    def sequences(self, texts: list[str]) -> tuple[list[list[int]], dict[int, list[int]]]:
        """Each text's token ids (special tokens included, truncated, unpadded), and the type ids
        of the texts whose types are not all 0, by row."""
        fast = self.fast
        seqs: list[list[int] | None] = (
            [fast.ids(t) for t in texts] if fast is not None else [None] * len(texts)
        )
        types: dict[int, list[int]] = {}
        rust_rows = [i for i, s in enumerate(seqs) if s is None]
        if rust_rows:
            encoded = self._rust.encode_batch_fast([texts[i] for i in rust_rows])
            for i, e in zip(rust_rows, encoded, strict=True):
                seqs[i] = e.ids
                if any(e.type_ids):
                    types[i] = e.type_ids
        return seqs, types  # type: ignore[return-value]

    def arrays(self, texts: list[str]) -> dict[str, np.ndarray]:
        """One batch in compact form (:func:`model_inputs` expands it): ``input_ids`` of shape
        (texts, width) in the narrowest integer type that holds the vocabulary, padded with the
        pad id to the longest text rounded up to a multiple of 8 (as the transformers wrapper
        pads with ``padding=True, truncation=True``); ``lengths`` (int32); and, for a model that
        takes them, ``token_type_ids`` (int8, the pad type in padding). A GPU batch crosses from
        worker processes and then to the GPU in this form: a sixth of the bytes of int64 inputs
        and their mask."""
        spec = self.spec
        seqs, types = self.sequences(texts)
        lengths = np.fromiter(map(len, seqs), np.int32, len(seqs))
        width = -(-int(lengths.max(initial=1)) // PAD_MULTIPLE) * PAD_MULTIPLE
        real = np.arange(width) < lengths[:, None]
        ids = np.full((len(seqs), width), spec.pad_id, self.id_type)
        ids[real] = np.fromiter(chain.from_iterable(seqs), self.id_type, int(lengths.sum()))
        out = {"input_ids": ids, "lengths": lengths}
        if spec.with_types:
            type_ids = np.where(real, 0, spec.pad_type_id).astype(np.int8)
            for row, row_types in types.items():
                type_ids[row, : len(row_types)] = row_types
            out["token_type_ids"] = type_ids
        return out


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """A compact batch's tensors (from :meth:`Tokeniser.arrays`, on any device) as the model
    takes them: int64 ids and types, and the attention mask rebuilt from the lengths."""
    import torch

    ids = batch["input_ids"]
    width = ids.shape[1]
    mask = torch.arange(width, device=ids.device) < batch["lengths"].unsqueeze(1)
    out = {"input_ids": ids.long(), "attention_mask": mask.long()}
    if "token_type_ids" in batch:
        out["token_type_ids"] = batch["token_type_ids"].long()
    return out


class AsciiWordPiece:
    """The Rust tokenizer's result for a text of printable ASCII (tabs and line breaks allowed),
    without its offset tracking, for a tokenizer with the BERT normaliser, the BERT
    pre-tokenizer and a WordPiece model.

    On such text the normaliser only lower-cases (when asked to) and the pre-tokenizer splits
    runs of letters and digits from single punctuation characters, dropping whitespace. Each
    word's pieces are looked up in a cache filled by the WordPiece model itself, so a word is
    split exactly as the Rust tokenizer splits it. :meth:`of` checks the tokenizer's kind and
    then checks the path against the Rust tokenizer on probe texts; a tokenizer that fails
    either check gets no fast path. A text holding an added token's content (``[MASK]``, say),
    or any other character, is left to the Rust tokenizer (:meth:`ids` returns None).
    """

    MAX_CACHED = 200_000  # words; the cache starts afresh beyond this, so memory stays bounded
    _OTHER = re.compile(r"[^\t\n\r -~]")
    _PUNCT = r"[!-/:-@\[-`{-~]"  # every printable ASCII character that is not a letter or digit
    PROBES = (
        "A plain sentence, with Punctuation: (brackets) & symbols_like-these! 3.14159 x2",
        "don't\tstop\nnow\r\n  UNBELIEVABLE antidisestablishmentarianism " + "z" * 120,
        "",
        "word " * 300,
    )

    def __init__(
        self,
        model: Any,
        *,
        lowercase: bool,
        prefix: list[int],
        suffix: list[int],
        max_length: int,
        added: list[str],
    ) -> None:
        self._model = model
        self._lower = lowercase
        self._words = re.compile((r"[a-z0-9]+|" if lowercase else r"[A-Za-z0-9]+|") + self._PUNCT)
        self._prefix = prefix
        self._suffix = suffix
        self._keep = max(0, max_length - len(prefix) - len(suffix))
        # any added token's content, in any case (it may be matched after lower-casing)
        contents = sorted((a for a in added if a), key=len, reverse=True)
        self._added = re.compile("|".join(map(re.escape, contents)), re.I) if contents else None
        self._pieces: dict[str, list[int]] = {}

    @classmethod
    def of(cls, rust: Any, max_length: int) -> AsciiWordPiece | None:
        """The fast path for ``rust`` (a tokenizer without padding, truncating to
        ``max_length``), or None where its kind or the probes rule one out."""
        config = json.loads(rust.to_str())
        norm, pre, model = (config.get(k) or {} for k in ("normalizer", "pre_tokenizer", "model"))
        if (
            norm.get("type") != "BertNormalizer"
            or not norm.get("clean_text", True)
            or pre.get("type") != "BertPreTokenizer"
            or model.get("type") != "WordPiece"
        ):
            return None
        word = [t.id for t in rust.model.tokenize("a")]
        probe = rust.encode("a", add_special_tokens=True)
        ids = list(probe.ids)
        at = next((i for i in range(len(ids)) if ids[i : i + len(word)] == word), None)
        if at is None or any(probe.type_ids):
            return None
        added = [t.content for t in rust.get_added_tokens_decoder().values()]
        fast = cls(
            rust.model,
            lowercase=bool(norm.get("lowercase", True)),
            prefix=ids[:at],
            suffix=ids[at + len(word) :],
            max_length=max_length,
            added=added,
        )
        for text in cls.PROBES:
            expected = rust.encode(text).ids
            if fast.ids(text) != expected:
                log.warning("fast_tokeniser_disabled", probe=text[:40])
                return None
        return fast

    def ids(self, text: str) -> list[int] | None:
        """``text``'s token ids, or None where the Rust tokenizer must tokenise it."""
        if self._OTHER.search(text) or (self._added and self._added.search(text)):
            return None
        if len(self._pieces) > self.MAX_CACHED:
            self._pieces.clear()
        pieces = self._pieces
        words = self._words.findall(text.lower() if self._lower else text)
        try:
            seq = list(chain.from_iterable(map(pieces.__getitem__, words)))
        except KeyError:
            for w in words:
                if w not in pieces:
                    pieces[w] = [t.id for t in self._model.tokenize(w)]
            seq = list(chain.from_iterable(map(pieces.__getitem__, words)))
        del seq[self._keep :]
        return self._prefix + seq + self._suffix


def joined(parts: list[dict[str, np.ndarray]], spec: TokeniserSpec) -> dict[str, np.ndarray]:
    """Compact batches tokenised apart, stacked into one padded to the widest of them."""
    if len(parts) == 1:
        return parts[0]
    width = max(part["input_ids"].shape[1] for part in parts)
    fill = {"input_ids": spec.pad_id, "token_type_ids": spec.pad_type_id}
    out = {
        key: np.concatenate(
            [
                np.pad(p[key], ((0, 0), (0, width - p[key].shape[1])), constant_values=fill[key])
                for p in parts
            ]
        )
        for key in parts[0]
        if key != "lengths"
    }
    out["lengths"] = np.concatenate([p["lengths"] for p in parts])
    return out


_WORKER: dict[str, Any] = {}  # this worker process's tokenizer


def _start_worker(spec: TokeniserSpec) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process
    _WORKER["tokeniser"] = Tokeniser(spec)


def _tokenise_in_worker(texts: list[str]) -> dict[str, np.ndarray]:
    return _WORKER["tokeniser"].arrays(texts)


class TokeniserPool:
    """``workers`` processes tokenising in parallel; :meth:`submit` returns a future of a chunk's
    arrays. A GPU batch is tokenised as several chunks of ``CHUNK`` texts, so even a single large
    batch spreads over every worker."""

    CHUNK = 128

    def __init__(self, spec: TokeniserSpec, workers: int) -> None:
        self.workers = workers
        self._pool = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(spec,),
        )

    def submit(self, texts: list[str]) -> Future[dict[str, np.ndarray]]:
        """A chunk's compact arrays (:meth:`Tokeniser.arrays`), tokenised in a worker."""
        return self._pool.submit(_tokenise_in_worker, texts)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def default_workers(device: str) -> int:
    """Tokeniser processes for ``device``: none on the CPU (the model needs the cores), and all
    cores but two (at most 16) beside a GPU."""
    if device != "cuda":
        return 0
    return max(1, min(16, (os.cpu_count() or 1) - 2))
