"""Encoder throughput against a naive baseline and the hardware's roofline, measured in one run.

    python benchmarks/encoder.py --device cpu|cuda --json OUT.json [--model-dir DIR]

For each text length (32, 128 and 256 tokens, special tokens included) and batch size it encodes
synthetic texts with :class:`models.encoder.TextEncoder` (tokenisation, transfers and pooling
included) and reports texts/s and the latency of one batch (p50/p99). In the same run, at 128
tokens, it measures what a user would write first: a Hugging Face ``feature-extraction``
pipeline called per text and a plain per-text loop, both with default settings (fp32), and
sentence-transformers ``encode`` where it is installed; and the roofline: the model's FLOPs per
text divided by the device's peak. Our speed is printed as a ratio to each, and our vectors'
cosine to the per-text fp32 vectors shows what the precision costs.

Texts are words drawn from the tokenizer's own vocabulary, each one token, so every text has
exactly the stated number of tokens. ``--model-dir`` may hold a half-precision copy of the
weights (``--save-half DIR`` writes one), which the GPU machine can receive where the fp32
weights are too large to carry.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.encoder import TextEncoder, packaged_model_dir

LENGTHS = (32, 128, 256)
HEADLINE = 128
# Dense bf16/fp16 tensor-core peaks from the vendors' data sheets (FLOP/s, no sparsity).
CUDA_PEAKS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989.4e12,
    "H200": 989.4e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
    "V100": 125e12,
}


def make_texts(tokenizer: Any, count: int, tokens: int, seed: int = 0) -> list[str]:
    """``count`` texts of exactly ``tokens`` tokens (with [CLS] and [SEP]), from whole-word,
    lower-case vocabulary entries."""
    vocab = [w for w in tokenizer.get_vocab() if re.fullmatch(r"[a-z]{3,12}", w)]
    rng = np.random.default_rng(seed)
    words = np.asarray(vocab)[rng.integers(0, len(vocab), size=(count, tokens - 2))]
    return [" ".join(row) for row in words]


def flops_per_text(config: Any, tokens: int) -> float:
    """Multiply-adds x 2 of one forward pass: projections, feed-forward and attention."""
    d, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    return float(layers * (8 * tokens * d * d + 4 * tokens * d * f + 4 * tokens * tokens * d))


def cpu_peak(precision: str) -> tuple[float, str]:
    """Cores x clock x FLOPs per cycle: fp32 on two FMA units, 64 with AVX-512 and 32 with AVX2;
    twice that for bf16 (AVX-512 BF16 dot products) and four times for int8 (VNNI)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    mhz = [float(m) for m in re.findall(r"cpu MHz\s*:\s*([\d.]+)", info)]
    flags = re.search(r"^flags\s*:(.*)$", info, re.M)
    wide = 64 if flags and "avx512f" in flags.group(1).split() else 32
    wide *= {"bf16": 2, "int8": 4}.get(precision, 1)
    cores = os.cpu_count() or 1
    clock = (max(mhz) if mhz else 2000.0) * 1e6
    return cores * clock * wide, f"{cores} cores x {clock / 1e9:.2f} GHz x {wide} FLOP/cycle"


def cuda_peak(name: str) -> tuple[float | None, str]:
    for key, peak in CUDA_PEAKS.items():
        if key in name:
            return peak, f"{key} data sheet, dense bf16/fp16"
    return None, "unknown device"


def gemm_flops(torch: Any, device: str) -> float:
    """What one large matrix product reaches here (the attainable peak)."""
    n = 8192 if device == "cuda" else 1024
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device == "cuda" else 5
    for _ in range(2):
        a @ b
    sync(torch, device)
    started = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(torch, device)
    return 2 * n**3 * reps / (time.perf_counter() - started)


def sync(torch: Any, device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def rate(run: Callable[[Sequence[str]], Any], texts: Sequence[str], min_s: float) -> float:
    """Texts per second of ``run`` over ``texts``, repeated until ``min_s`` has passed."""
    done, started = 0, time.perf_counter()
    while True:
        run(texts)
        done += len(texts)
        elapsed = time.perf_counter() - started
        if elapsed >= min_s:
            return done / elapsed


def batch_latency(encoder: TextEncoder, texts: Sequence[str], reps: int) -> tuple[float, float]:
    """p50 and p99 (ms) of encoding one batch, its vectors back on the host."""
    times = []
    for n in range(reps):
        start = (n * encoder.batch_size) % max(len(texts) - encoder.batch_size, 1)
        chunk = texts[start : start + encoder.batch_size]
        began = time.perf_counter()
        encoder.encode(chunk)
        times.append((time.perf_counter() - began) * 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]


def tokeniser_rates(encoder: TextEncoder, texts: Sequence[str], min_s: float) -> dict[str, float]:
    """Texts per second that one core tokenises (compact arrays, as the encoder uses them), with
    the ASCII fast path and with the Rust tokenizer alone."""
    tokeniser, batch = encoder._tokeniser, list(texts)
    fast = rate(tokeniser.arrays, batch, min_s)
    kept, tokeniser.fast = tokeniser.fast, None
    try:
        rust = rate(tokeniser.arrays, batch, min_s)
    finally:
        tokeniser.fast = kept
    return {"fast": round(fast, 1), "rust": round(rust, 1)}


class Naive:
    """The per-text code a user writes first, fp32, default settings."""

    def __init__(self, model_dir: Path, device: str) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer, pipeline

        self.torch = torch
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).to(device)
        self.model.eval()
        self.pipe = pipeline(
            "feature-extraction", model=self.model, tokenizer=self.tokenizer, device=device
        )

    def loop(self, texts: Sequence[str]) -> np.ndarray:
        torch, out = self.torch, []
        with torch.no_grad():
            for text in texts:
                batch = self.tokenizer(text, return_tensors="pt").to(self.device)
                hidden = self.model(**batch).last_hidden_state[0]
                vec = hidden.mean(0)
                out.append((vec / vec.norm()).cpu().numpy())
        return np.stack(out)

    def pipeline(self, texts: Sequence[str]) -> np.ndarray:
        out = []
        for text in texts:
            hidden = np.asarray(self.pipe(text)[0])
            vec = hidden.mean(0)
            out.append(vec / np.linalg.norm(vec))
        return np.stack(out)


def sentence_transformers_rate(
    model_dir: Path, device: str, texts: Sequence[str], min_s: float
) -> float | None:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    model = SentenceTransformer(str(model_dir), device=device)
    model.encode(list(texts[:64]))
    return rate(lambda t: model.encode(list(t)), texts, min_s)


def save_half(model_dir: Path, out: Path) -> None:
    """A copy of the model with fp16 weights (half the bytes), tokenizer included."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    AutoModel.from_pretrained(str(model_dir), dtype=torch.float16).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(out))
    print(f"wrote {out}")


def main(argv: list[str]) -> int:  # noqa: PLR0915
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--model-dir", type=Path, help="default: the packaged all-MiniLM-L6-v2")
    parser.add_argument(
        "--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16", "int8"]
    )
    parser.add_argument("--batch-sizes", help="comma-separated (default: by device)")
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    parser.add_argument("--seconds", type=float, default=None, help="time per measurement")
    parser.add_argument("--naive-texts", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument(
        "--tokeniser-workers", type=int, help="tokeniser processes (default: by device)"
    )
    parser.add_argument("--save-half", type=Path, help="write an fp16 copy of the model and exit")
    args = parser.parse_args(argv)
    model_dir = args.model_dir or packaged_model_dir()
    if args.save_half:
        save_half(model_dir, args.save_half)
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is usable here", file=sys.stderr)
        return 2
    cuda = args.device == "cuda"
    sizes = [
        int(b) for b in (args.batch_sizes or ("1024,2048,4096" if cuda else "8,32,128")).split(",")
    ]
    lengths = [int(n) for n in args.lengths.split(",")]
    min_s = args.seconds or (3.0 if cuda else 6.0)
    encoder = TextEncoder(
        model_dir,
        device=args.device,
        max_length=max(lengths),
        precision=args.precision,
        compile_model=args.compile,
        tokeniser_workers=args.tokeniser_workers,
    )
    config = encoder.model.config
    name = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    if cuda:
        peak, peak_source = cuda_peak(name)
    else:
        peak, peak_source = cpu_peak(encoder.precision)
    attainable = gemm_flops(torch, args.device)
    if peak is None:
        peak, peak_source = attainable, "measured bf16 matrix product"
    weights = next(p for p in encoder.model.parameters()).dtype
    print(f"tokeniser processes {encoder.tokeniser_workers}")
    print(
        f"device {name}; precision {encoder.precision}; model {encoder.version} "
        f"({model_dir}, stored weights {weights}); torch {torch.__version__}; "
        f"threads {torch.get_num_threads()}"
    )
    print(
        f"peak {peak / 1e12:.2f} TFLOP/s ({peak_source}); one large matrix product reaches "
        f"{attainable / 1e12:.2f} TFLOP/s"
    )

    rows: list[dict[str, Any]] = []
    print(
        f"\n{'tokens':>6} {'batch':>6} {'texts/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'roofline':>9}"
    )
    for tokens in lengths:
        texts = make_texts(encoder.tokenizer, 8192 if cuda else 512, tokens)
        roof = peak / flops_per_text(config, tokens)
        for size in sizes:
            encoder.batch_size = size
            # Warm-up (and compilation); on CUDA two whole passes, so that every tokeniser
            # process has started before the clock runs.
            for _ in range(2 if cuda else 1):
                encoder.encode(texts if cuda else texts[: size * 2])
            sync(torch, args.device)
            got = rate(encoder.encode, texts, min_s)
            p50, p99 = batch_latency(encoder, texts, 30 if cuda else 8)
            rows.append(
                {
                    "tokens": tokens,
                    "batch": size,
                    "texts_per_s": round(got, 1),
                    "batch_p50_ms": round(p50, 2),
                    "batch_p99_ms": round(p99, 2),
                    "roofline_texts_per_s": round(roof, 1),
                    "ratio_vs_roofline": round(got / roof, 4),
                }
            )
            print(f"{tokens:>6} {size:>6} {got:>10.1f} {p50:>8.2f} {p99:>8.2f} {got / roof:>9.1%}")

    head = max(
        (r for r in rows if r["tokens"] == HEADLINE),
        key=lambda r: r["texts_per_s"],
        default=max(rows, key=lambda r: r["texts_per_s"]),
    )
    tokens = head["tokens"]
    naive_n = args.naive_texts or (1000 if cuda else 64)
    sample = make_texts(encoder.tokenizer, naive_n, tokens, seed=1)
    one_core = tokeniser_rates(encoder, make_texts(encoder.tokenizer, 1024, tokens, 2), min_s)
    naive = Naive(model_dir, args.device)
    naive.loop(sample[:4])
    loop_rate = rate(naive.loop, sample, min_s)
    pipe_rate = rate(naive.pipeline, sample, min_s)
    st_rate = sentence_transformers_rate(model_dir, args.device, sample * (4 if cuda else 1), min_s)
    encoder.batch_size = head["batch"]
    ours = encoder.encode(sample)
    reference = naive.loop(sample)
    cosine = np.sum(ours * reference, axis=1)
    naive_rate = max(loop_rate, pipe_rate)
    ours_rate = head["texts_per_s"]
    result = {
        "device": args.device,
        "device_name": name,
        "precision": encoder.precision,
        "weights": f"{model_dir.name} ({weights})",
        "compiled": args.compile,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "tokeniser_workers": encoder.tokeniser_workers,
        "tokens": tokens,
        "batch_size": head["batch"],
        "texts_per_s": ours_rate,
        "naive_texts_per_s": round(naive_rate, 1),
        "naive_loop_texts_per_s": round(loop_rate, 1),
        "naive_pipeline_texts_per_s": round(pipe_rate, 1),
        "ratio_vs_naive": round(ours_rate / naive_rate, 2),
        "sentence_transformers_texts_per_s": round(st_rate, 1) if st_rate else None,
        "ratio_vs_sentence_transformers": round(ours_rate / st_rate, 2) if st_rate else None,
        "tokeniser_one_core_texts_per_s": one_core,
        "roofline_texts_per_s": head["roofline_texts_per_s"],
        "ratio_vs_roofline": head["ratio_vs_roofline"],
        "peak_flops": peak,
        "peak_source": peak_source,
        "gemm_flops": round(attainable),
        "flops_per_text": flops_per_text(config, tokens),
        "cosine_to_fp32_min": round(float(cosine.min()), 5),
        "cosine_to_fp32_mean": round(float(cosine.mean()), 5),
        "runs": rows,
    }
    print(f"\nat {tokens} tokens, batch {head['batch']}: {ours_rate:.1f} texts/s")
    print(
        f"  naive per-text loop     {loop_rate:>10.1f} texts/s  ours = {ours_rate / loop_rate:.2f}x"
    )
    print(
        f"  naive HF pipeline       {pipe_rate:>10.1f} texts/s  ours = {ours_rate / pipe_rate:.2f}x"
    )
    if st_rate:
        print(
            f"  sentence-transformers   {st_rate:>10.1f} texts/s  ours = {ours_rate / st_rate:.2f}x"
        )
    print(
        f"  roofline                {head['roofline_texts_per_s']:>10.1f} texts/s  "
        f"ours = {head['ratio_vs_roofline']:.1%}"
    )
    print(
        f"  cosine to the fp32 per-text vectors: min {cosine.min():.5f}, mean {cosine.mean():.5f}"
    )
    print(
        f"  tokenising on one core: {one_core['fast']:.0f} texts/s with the ASCII fast path, "
        f"{one_core['rust']:.0f} with the Rust tokenizer alone"
    )
    encoder.close()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
