"""The packaged all-MiniLM-L6-v2 encoder on the CPU: reference parity, shape, order, load errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from models.encoder import (
    EncodeError,
    EncoderLoadError,
    TextEncoder,
    cpu_has_bf16,
    resolve_device,
    resolve_precision,
)
from models.tokenise import TokeniserSpec, joined

REFERENCE = Path(__file__).parent / "fixtures" / "minilm_reference.json"
DIM = 384


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    """The packaged model loaded once for the module, on the CPU (fp32, as the reference)."""
    return TextEncoder(device="cpu", precision="fp32")


def test_embeddings_match_sentence_transformers_reference(encoder: TextEncoder) -> None:
    """Vectors of the reference texts equal sentence-transformers' within 1e-4 (max abs diff)."""
    reference = json.loads(REFERENCE.read_text())
    expected = np.asarray(reference["vectors"], dtype=np.float32)
    got = encoder.encode(reference["texts"])
    assert got.shape == expected.shape == (3, DIM)
    assert float(np.abs(got - expected).max()) < 1e-4


def test_outputs_are_unit_norm_float32_rows(encoder: TextEncoder) -> None:
    """encode returns an (n, 384) float32 array of unit-length rows and reports dim 384."""
    got = encoder.encode(["one", "two words", "three little words", "🚀 unicode ünïcödé"])
    assert encoder.dim == DIM
    assert got.dtype == np.float32
    assert got.shape == (4, DIM)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_batch_order_is_preserved_across_very_different_lengths(encoder: TextEncoder) -> None:
    """Length-sorted batching gives each text the vector it gets alone, in input order."""
    texts = [
        "A much longer sentence about generation ships and distant stars. " * 30,
        "x",
        "medium length text about coffee beans and burr grinders",
        "",
        "hi there",
        "A much longer sentence about generation ships and distant stars. " * 30,
    ]
    batched = encoder.encode(texts)
    alone = np.stack([encoder.encode([t])[0] for t in texts])
    assert float(np.abs(batched - alone).max()) < 1e-5
    np.testing.assert_array_equal(batched[0], batched[5])
    assert float(batched[0] @ batched[1]) < 0.9  # different texts really got different rows


def test_batches_smaller_than_the_input_keep_order(encoder: TextEncoder) -> None:
    """With a batch size of 2, texts spread over several batches still land in their rows."""
    texts = ["apple pie recipe", "z", "a very long review of a kettle " * 10, "tea", "ok then"]
    whole = encoder.encode(texts)
    saved = encoder.batch_size
    encoder.batch_size = 2
    try:
        split = encoder.encode(texts)
    finally:
        encoder.batch_size = saved
    assert float(np.abs(whole - split).max()) < 1e-5


def test_empty_input_gives_an_empty_matrix(encoder: TextEncoder) -> None:
    """No texts give a (0, 384) float32 array."""
    got = encoder.encode([])
    assert got.shape == (0, DIM)
    assert got.dtype == np.float32


def test_version_names_the_packaged_model(encoder: TextEncoder) -> None:
    """The packaged model's version is its name plus an 8-hex digest of its files."""
    name, digest = encoder.version.split("@")
    assert name == "all-MiniLM-L6-v2"
    assert len(digest) == 8
    int(digest, 16)


def test_semantic_neighbours_are_closer_than_unrelated_text(encoder: TextEncoder) -> None:
    """A sci-fi sentence is closer to another sci-fi sentence than to a coffee sentence."""
    scifi, scifi2, coffee = encoder.encode(
        [
            "A starship crew awakens from cryosleep light-years from Earth.",
            "Space opera about an interstellar war between alien empires.",
            "Freshly ground arabica beans make a smooth espresso.",
        ]
    )
    assert float(scifi @ scifi2) > float(scifi @ coffee) + 0.1


def test_cuda_request_without_cuda_falls_back_to_cpu() -> None:
    """device="cuda" on a machine without CUDA loads on the CPU and logs the fallback."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here; the fallback cannot happen")
    assert resolve_device("auto") == "cpu"
    with capture_logs() as logs:
        fallback = TextEncoder(device="cuda")
    assert fallback.device == "cpu"
    assert {"event": "cuda_unavailable", "fallback": "cpu", "log_level": "warning"} in logs
    assert fallback.encode(["still works"]).shape == (1, DIM)


def test_missing_model_dir_raises_a_one_line_load_error(tmp_path: Path) -> None:
    """A model directory that does not exist is an EncoderLoadError naming it, on one line."""
    missing = tmp_path / "no-such-model"
    with pytest.raises(EncoderLoadError) as caught:
        TextEncoder(model_dir=missing)
    message = str(caught.value)
    assert "\n" not in message
    assert str(missing) in message
    assert "config.json" in message


def test_unreadable_model_config_raises_a_load_error(tmp_path: Path) -> None:
    """A directory whose config.json is not JSON is an EncoderLoadError naming the directory."""
    (tmp_path / "config.json").write_text("not json")
    with pytest.raises(EncoderLoadError, match="cannot load the model at") as caught:
        TextEncoder(model_dir=tmp_path)
    assert str(tmp_path) in str(caught.value)


TEXTS = [
    "A starship crew awakens from cryosleep light-years from Earth.",
    "Freshly ground arabica beans make a smooth espresso.",
    "a short one",
    "A long review of a kettle that boils quickly and pours well. " * 12,
    "Digital multimeter with auto-ranging and a backlit display.",
]


def test_bf16_vectors_stay_within_cosine_0_999_of_fp32(encoder: TextEncoder) -> None:
    """The CPU's bf16 path (the default where the CPU multiplies bf16 natively) gives every text
    a vector whose cosine to the fp32 vector is at least 0.999, and names its precision."""
    half = TextEncoder(device="cpu", precision="bf16")
    cosine = np.sum(half.encode(TEXTS) * encoder.encode(TEXTS), axis=1)
    assert half.version.endswith("+bf16")
    assert float(cosine.min()) > 0.999


def test_int8_quantisation_is_named_and_close_but_not_exact(encoder: TextEncoder) -> None:
    """Dynamic int8 quantisation runs on the CPU, is named in the version (so caches never mix
    it with fp32), and its vectors stay near the fp32 ones without equalling them."""
    quantised = TextEncoder(device="cpu", precision="int8")
    got, exact = quantised.encode(TEXTS), encoder.encode(TEXTS)
    cosine = np.sum(got * exact, axis=1)
    assert quantised.version.endswith("+int8")
    assert float(cosine.min()) > 0.9
    assert float(np.abs(got - exact).max()) > 1e-3


def test_precision_falls_back_instead_of_failing() -> None:
    """auto is bf16 on CUDA; int8 asked for on CUDA falls back to bf16 with a warning; explicit
    CPU precisions are kept."""
    assert resolve_precision("auto", "cuda") == "bf16"
    with capture_logs() as logs:
        assert resolve_precision("int8", "cuda") == "bf16"
    assert logs[0]["event"] == "precision_unavailable"
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("int8", "cpu") == "int8"
    assert resolve_precision("auto", "cpu") == ("bf16" if cpu_has_bf16() else "fp32")


def test_out_of_memory_splits_the_batch_and_keeps_every_vector(
    encoder: TextEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forward pass that runs out of memory for more than two rows is split in halves until
    it fits; the vectors equal the unsplit ones and each split is logged."""
    import torch

    whole = encoder.encode(TEXTS)
    model = encoder.model

    def small_memory(**inputs: torch.Tensor) -> object:
        if len(inputs["input_ids"]) > 2:
            raise torch.OutOfMemoryError("out of memory (test)")
        return model(**inputs)

    monkeypatch.setattr(encoder, "_forward", small_memory)
    with capture_logs() as logs:
        split = encoder.encode(TEXTS)
    splits = [entry["rows"] for entry in logs if entry["event"] == "encode_out_of_memory"]
    assert splits == [5, 3]
    assert float(np.abs(split - whole).max()) < 1e-5


def test_a_text_that_never_fits_raises_encode_error(
    encoder: TextEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When even one text runs out of memory the encoder raises EncodeError (a RuntimeError, so
    the encode step dead-letters that text alone) rather than looping or crashing."""
    import torch

    def no_memory(**_: torch.Tensor) -> object:
        raise torch.OutOfMemoryError("out of memory (test)")

    monkeypatch.setattr(encoder, "_forward", no_memory)
    with pytest.raises(EncodeError, match="does not fit"):
        encoder.encode(["one text"])


def test_tokeniser_processes_give_the_vectors_of_in_process_tokenising(
    encoder: TextEncoder,
) -> None:
    """One batch of 150 texts tokenised in worker processes (the GPU path's pool, here forced on
    the CPU) as three chunks joined back into one padded batch gives the same vectors in the same
    order as tokenising it here."""
    texts = [f"item {n}: " + "stars and ships " * (n % 23) for n in range(150)]
    pooled = TextEncoder(device="cpu", precision="fp32", batch_size=200, tokeniser_workers=2)
    try:
        got = pooled.encode(texts)
        assert pooled._tokeniser_pool is not None
    finally:
        pooled.close()
    assert float(np.abs(got - encoder.encode(texts)).max()) < 1e-5


def test_joined_chunks_pad_to_the_widest() -> None:
    """Chunks of different widths stack into one batch padded with the pad id, mask 0."""
    spec = TokeniserSpec("{}", 16, pad_id=0, pad_token="[PAD]", pad_type_id=0, with_types=True)
    one = {k: np.ones((2, 3), np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    two = {k: np.full((1, 5), 2, np.int64) for k in one}
    both = joined([one, two], spec)
    assert both["input_ids"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [2, 2, 2, 2, 2]]
    assert both["attention_mask"][:2, 3:].sum() == 0
