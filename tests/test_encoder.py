"""The packaged all-MiniLM-L6-v2 encoder on the CPU: reference parity, shape, order, load errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from models.encoder import EncoderLoadError, TextEncoder, resolve_device

REFERENCE = Path(__file__).parent / "fixtures" / "minilm_reference.json"
DIM = 384


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    """The packaged model loaded once for the module, on the CPU (fp32, as the reference)."""
    return TextEncoder(device="cpu")


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
