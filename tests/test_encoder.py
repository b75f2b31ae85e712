"""The packaged all-MiniLM-L6-v2 encoder on the CPU: reference parity, shape, order, load errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA
from structlog.testing import capture_logs

from models.encoder import (
    EncodeError,
    EncoderLoadError,
    TextEncoder,
    cpu_has_bf16,
    resolve_device,
    resolve_precision,
)
from models.tokenise import AsciiWordPiece, Tokeniser, TokeniserSpec, joined, model_inputs

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
    """One batch of 300 texts tokenised in worker processes (the GPU path's pool, here forced on
    the CPU) as three chunks joined back into one padded batch gives the same vectors in the same
    order as tokenising it here."""
    texts = [f"item {n}: " + "stars and ships " * (n % 23) for n in range(300)]
    pooled = TextEncoder(device="cpu", precision="fp32", batch_size=400, tokeniser_workers=2)
    try:
        got = pooled.encode(texts)
        assert pooled._tokeniser_pool is not None
    finally:
        pooled.close()
    assert float(np.abs(got - encoder.encode(texts)).max()) < 1e-5


def test_joined_chunks_pad_to_the_widest() -> None:
    """Compact chunks of different widths stack into one batch padded with the pad id and the
    pad type, their lengths kept; expanded, the mask is 0 exactly in the padding."""
    import torch

    spec = TokeniserSpec("{}", 16, pad_id=0, pad_type_id=1, with_types=True)
    one = {
        "input_ids": np.full((2, 3), 7, np.uint16),
        "token_type_ids": np.zeros((2, 3), np.int8),
        "lengths": np.array([3, 2], np.int32),
    }
    two = {
        "input_ids": np.full((1, 5), 9, np.uint16),
        "token_type_ids": np.zeros((1, 5), np.int8),
        "lengths": np.array([5], np.int32),
    }
    both = joined([one, two], spec)
    assert both["input_ids"].tolist() == [[7, 7, 7, 0, 0], [7, 7, 7, 0, 0], [9, 9, 9, 9, 9]]
    assert both["token_type_ids"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 1], [0] * 5]
    assert both["lengths"].tolist() == [3, 2, 5]
    inputs = model_inputs({k: torch.from_numpy(v) for k, v in both.items()})
    assert inputs["input_ids"].dtype == torch.int64
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1] * 5]


ODD_TEXTS = [
    "Café naïve 東京 menu",  # accents and CJK: the Rust tokenizer's
    "a bell\x07 rings",  # a control character
    "[MASK] and [CLS] written in the text",  # special tokens' content
    "[brackets] alone are punctuation",
    "snake_case, kebab-case & CamelCase; 3.14159 x 10^-3 {braces} ~tilde` |pipe|",
    "tabs\tand\nline\r\nbreaks   and  spaces",
    "",
    "   ",
    "a" * 150,  # longer than WordPiece's 100 characters: [UNK]
    "unbelievably antidisestablishmentarianism hyperparameterisation",
    "word " * 400,  # truncated
]


@pytest.mark.parametrize("max_length", [32, 256])
def test_fast_tokeniser_gives_the_wrappers_inputs(encoder: TextEncoder, max_length: int) -> None:
    """The tokeniser (ASCII fast path, the Rust tokenizer for the rest) gives exactly the ids and
    mask of the transformers wrapper with padding and truncation, for odd texts and for
    catalogue-like ones; the fast path takes the plain ASCII texts and leaves the others."""
    import torch

    tokeniser = Tokeniser(TokeniserSpec.of(encoder.tokenizer, max_length))
    assert tokeniser.fast is not None
    texts = ODD_TEXTS + [f"Item {n}: 'stars' & ships (x{n}), {n * 7} cm!" for n in range(40)]
    got = model_inputs({k: torch.from_numpy(v) for k, v in tokeniser.arrays(texts).items()})
    want = encoder.tokenizer(
        texts, padding=True, truncation=True, max_length=max_length, pad_to_multiple_of=8
    )
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert got[key].tolist() == want[key], key
    fast = [tokeniser.fast.ids(t) is not None for t in ODD_TEXTS]
    assert fast == [False, False, False, True, True, True, True, True, True, True, True]


def test_fast_tokeniser_is_refused_where_it_would_differ(encoder: TextEncoder) -> None:
    """A tokenizer whose normaliser is not BERT's gets no fast path (every text then goes through
    the Rust tokenizer), so no model is tokenised by rules it does not use; a cased BERT
    normaliser gets one that keeps the case."""
    import json

    from tokenizers import Tokenizer

    config = json.loads(encoder.tokenizer.backend_tokenizer.to_str())
    config["normalizer"] = {"type": "Lowercase"}
    other = Tokenizer.from_str(json.dumps(config))
    assert AsciiWordPiece.of(other, 64) is None
    config["normalizer"] = {
        "type": "BertNormalizer",
        "clean_text": True,
        "handle_chinese_chars": True,
        "strip_accents": None,
        "lowercase": False,
    }
    cased = Tokenizer.from_str(json.dumps(config))
    cased.no_padding()
    cased.enable_truncation(64)
    fast = AsciiWordPiece.of(cased, 64)
    assert fast is not None
    assert fast.ids("Hello World") == cased.encode("Hello World").ids
    assert fast.ids("Hello World") != fast.ids("hello world")


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared data absent")
def test_fast_tokeniser_matches_the_wrapper_on_real_catalogue_and_reviews(
    encoder: TextEncoder,
) -> None:
    """On every amazon-scientific item text and every amazon-instruments-2014 review, batches of
    256 get exactly the transformers wrapper's ids, mask and types at 128 tokens, and nearly all
    of these texts (over 95 %) take the fast path."""
    import gzip

    import torch

    with (SHARED_DATA / "amazon-scientific" / "Scientific.text").open(encoding="utf-8") as f:
        texts = [line.rstrip("\n").split("\t", 1)[1] for line in list(f)[1:]]
    with gzip.open(SHARED_DATA / "amazon-instruments-2014" / "Musical_Instruments.json.gz") as f:
        texts += [json.loads(line).get("reviewText", "") for line in f]
    assert len(texts) == 4385 + 10261
    tokeniser = Tokeniser(TokeniserSpec.of(encoder.tokenizer, 128))
    for start in range(0, len(texts), 256):
        chunk = texts[start : start + 256]
        arrays = tokeniser.arrays(chunk)
        got = model_inputs({k: torch.from_numpy(v) for k, v in arrays.items()})
        want = encoder.tokenizer(
            chunk, padding=True, truncation=True, max_length=128, pad_to_multiple_of=8
        )
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            assert got[key].tolist() == want[key], (start, key)
    assert tokeniser.fast is not None
    fast = sum(tokeniser.fast.ids(t) is not None for t in texts)
    assert fast / len(texts) > 0.95
    print(f"fast path: {fast} of {len(texts)} texts")


def test_batch_size_defaults_by_device(encoder: TextEncoder) -> None:
    """Unset, the batch size is 64 on the CPU and 1024 on CUDA (the GPU needs large batches);
    the settings leave it unset, and a set value wins."""
    from infra.settings import EncoderSettings
    from models.encoder import default_batch_size

    assert EncoderSettings().batch_size is None
    assert (default_batch_size("cpu"), default_batch_size("cuda")) == (64, 1024)
    assert encoder.batch_size == 64
    assert TextEncoder(device="cpu", precision="fp32", batch_size=8).batch_size == 8
