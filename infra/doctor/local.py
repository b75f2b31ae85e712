"""The doctor's local checks: settings and versions (context), vector store, encoder, ranker, GPU.

The vector store is read without being changed: an embedded Qdrant Edge store's configuration is
read from disk instead of opening its shards, so the check runs beside a worker that holds them.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
from pathlib import Path

from infra.doctor.findings import Finding, Status, _short
from infra.settings import EncoderSettings, Settings, VectorSettings
from infra.vectors import VectorStore

WORKER_EXTRA = "pip install 'recstream[worker]' (needed on worker machines only)"


# --- context -----------------------------------------------------------------------------------


def settings_info(settings: Settings, env_file: Path | None) -> Finding:
    """Where the settings came from, and the names (never the values) of those set explicitly."""
    aliases = {"bootstrap_servers", "qdrant_url", "encoder_model", "device"}  # folded into sections
    named: list[str] = []
    for name in sorted(settings.model_fields_set - aliases):
        section = getattr(settings, name)
        fields = getattr(section, "model_fields_set", None)
        named += [f"{name}.{f}" for f in sorted(fields)] if fields else [name]
    source = (
        f"--env-file {env_file} and RECSTREAM_* variables" if env_file else "RECSTREAM_* variables"
    )
    return Finding(
        "settings",
        Status.INFO,
        f"{source}; set: {', '.join(named) or 'nothing (all defaults)'}; "
        f"data dir {settings.data_dir}",
    )


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions_info() -> Finding:
    """Python and the versions of the packages a worker depends on most."""
    import confluent_kafka

    return Finding(
        "versions",
        Status.INFO,
        f"Python {platform.python_version()}, recstream {_version('recstream')}, "
        f"confluent-kafka {_version('confluent-kafka')} "
        f"(librdkafka {confluent_kafka.libversion()[0]}), "
        f"torch {_version('torch')}, qdrant-edge-py {_version('qdrant-edge-py')}",
    )


# --- vector store ------------------------------------------------------------------------------


def _schema(store: VectorStore, name: str) -> tuple[int, str] | None:
    """(vector size, distance) of a collection, or None when it does not exist.

    The store interface has no schema query, and ``ensure_collection`` would create the
    collection, so the doctor reads it itself: from the shard's configuration file on disk for
    Qdrant Edge (without opening the shard, which a running worker holds locked), from the
    collection info for a Qdrant server.
    """
    from infra.vectors.edge import _CONFIG_FILE, EdgeVectorStore

    if isinstance(store, EdgeVectorStore):
        config_file = store._directory(name) / _CONFIG_FILE
        if not config_file.is_file():
            return None
        vectors = json.loads(config_file.read_text(encoding="utf-8"))["vectors"]
        params = vectors.get("", {"size": 0, "distance": "named vectors only"})
        return int(params["size"]), str(params["distance"])
    client = store._client  # type: ignore[attr-defined]  # QdrantServerStore
    if not client.collection_exists(name):
        return None
    params = client.get_collection(name).config.params.vectors
    if isinstance(params, dict):  # named vectors; recstream writes one unnamed vector
        return 0, "named vectors only"
    return int(params.size), str(getattr(params.distance, "value", params.distance))


def _location(store: VectorStore, name: str) -> str:
    """Where a collection lives, for a fix hint: its directory (Edge) or its name (server)."""
    from infra.vectors.edge import EdgeVectorStore

    if isinstance(store, EdgeVectorStore):
        return str(store._directory(name))
    return f"collection {name!r}"


def check_collections(store: VectorStore, vectors: VectorSettings, where: str) -> Finding:
    """The items and reviews collections hold ``vectors.dim``-d cosine vectors, or do not exist."""
    fine, absent, problems, wrong = [], [], [], []
    for name in (vectors.items_collection, vectors.reviews_collection):
        schema = _schema(store, name)
        if schema is None:
            absent.append(name)
            continue
        if schema[0] != vectors.dim:
            problems.append(f"{name!r} holds {schema[0]}-d vectors, vectors.dim is {vectors.dim}")
        elif schema[1].lower() != "cosine":
            problems.append(f"{name!r} uses {schema[1]} distance, recstream needs Cosine")
        else:
            fine.append(name)
            continue
        wrong.append(_location(store, name))
    if problems:
        return Finding(
            "vector-store",
            Status.FAIL,
            f"{where}: {'; '.join(problems)}",
            f"with the workers stopped, delete {' and '.join(wrong)}, then `recstream reencode "
            "LOG` creates and fills it again from the event log; or, if the encoder really makes "
            "the stored width, set RECSTREAM_VECTORS__DIM to it",
        )
    parts = [f"{', '.join(fine)} ok ({vectors.dim}-d, cosine)"] if fine else []
    if absent:
        parts.append(f"{', '.join(absent)} not created yet (a worker creates them at start)")
    return Finding("vector-store", Status.OK, f"{where}: {'; '.join(parts)}")


def _writable_parent(path: Path) -> Path | None:
    """The nearest existing directory at or above ``path`` if it is not writable, else None."""
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return None if os.access(probe, os.W_OK) else probe


def check_vector_store(settings: Settings, timeout: float) -> Finding:
    """The configured store answers, and its collections fit the configured encoder."""
    vectors = settings.vectors
    try:
        if vectors.url:
            from infra.vectors.server import QdrantServerStore

            key = vectors.api_key.get_secret_value() if vectors.api_key is not None else None
            store: VectorStore = QdrantServerStore.from_url(
                vectors.url, key, timeout=max(1, math.ceil(timeout)), tls_ca=vectors.tls_ca
            )
        else:
            from infra.vectors import open_vector_store

            store = open_vector_store(settings)
    except ImportError as exc:
        return Finding("vector-store", Status.WARN, f"not installed: {exc.name}", WORKER_EXTRA)
    where = f"Qdrant server {vectors.url}" if vectors.url else f"Qdrant Edge {settings.vectors_dir}"
    try:
        if not vectors.url and (locked := _writable_parent(settings.vectors_dir)) is not None:
            return Finding(
                "vector-store",
                Status.FAIL,
                f"{where}: {locked} is not writable",
                "set RECSTREAM_DATA_DIR to a directory the worker may write",
            )
        return check_collections(store, vectors, where)
    except Exception as exc:  # noqa: BLE001 - any client error is the finding itself
        from infra.vectors.retry import is_transient

        if not vectors.url:
            fix = f"check the shard directories under {settings.vectors_dir}"
        elif is_transient(exc):
            fix = "start the Qdrant server or correct RECSTREAM_QDRANT_URL"
        else:
            fix = "check RECSTREAM_VECTORS__API_KEY / TLS_CA and the server's log"
        return Finding("vector-store", Status.FAIL, f"{where}: {_short(exc)}", fix)
    finally:
        store.close()


# --- encoder, trained ranker, GPU --------------------------------------------------------------

_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "tokenizer.model")


def _weights_problem(file: Path) -> str | None:
    """Why a weights file cannot be loaded (a Git LFS pointer, truncated), or None."""
    size = file.stat().st_size
    with file.open("rb") as fh:
        head = fh.read(8)
        if head.startswith(b"version "):
            return f"{file.name} is a Git LFS pointer, not weights: run `git lfs pull` there"
        if file.suffix != ".safetensors":
            return None if size > 1024 else f"{file.name} is only {size} bytes"
        length = int.from_bytes(head, "little") if len(head) == 8 else 0
        if not 0 < length <= size - 8:
            return f"{file.name} is not a safetensors file ({size} bytes)"
        header = json.loads(fh.read(length))
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end > size:
        return f"{file.name} is truncated ({size} of {8 + length + end} bytes)"
    return None


def _files_problem(path: Path, weights: list[Path]) -> str | None:
    """What keeps the model directory from loading: missing files or broken weights, or None."""
    missing = [] if (path / "config.json").is_file() else ["config.json"]
    missing += [] if any((path / f).is_file() for f in _TOKENIZER_FILES) else ["a tokenizer"]
    missing += [] if weights else ["weights (*.safetensors or pytorch_model.bin)"]
    if missing:
        return f"lacks {', '.join(missing)}"
    return "; ".join(p for p in map(_weights_problem, weights) if p) or None


def check_encoder(settings: Settings) -> Finding:
    """The encoder model resolves to a local directory with config, tokenizer and weights."""
    try:
        from models.encoder import DEFAULT_MODEL_NAME, EncoderLoadError, packaged_model_dir
    except ImportError as exc:
        return Finding("encoder", Status.WARN, f"not installed: {exc.name}", WORKER_EXTRA)
    fix = (
        "set RECSTREAM_ENCODER_MODEL to a local directory holding config.json, a tokenizer and "
        "weights (*.safetensors), or unset it to use the packaged all-MiniLM-L6-v2"
    )
    try:
        path = settings.encoder.model or packaged_model_dir()
    except EncoderLoadError as exc:
        return Finding("encoder", Status.WARN, _short(exc), WORKER_EXTRA)
    name = path.name if settings.encoder.model else DEFAULT_MODEL_NAME
    if not path.is_dir():
        return Finding("encoder", Status.FAIL, f"model directory {path} does not exist", fix)
    weights = sorted(path.glob("*.safetensors")) + sorted(path.glob("pytorch_model*.bin"))
    problem = _files_problem(path, weights)
    if problem:
        return Finding("encoder", Status.FAIL, f"{path}: {problem}", fix)
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    dim = config.get("hidden_size") or config.get("d_model") or config.get("dim")
    size_mb = sum(w.stat().st_size for w in weights) / 1e6
    about = f"{name} ({config.get('model_type', '?')}, {dim}-d, {size_mb:.0f} MB) at {path}"
    if dim != settings.vectors.dim:
        return Finding(
            "encoder",
            Status.FAIL,
            f"{about}: it makes {dim}-d vectors but vectors.dim is {settings.vectors.dim}",
            f"set RECSTREAM_VECTORS__DIM={dim} (and rebuild the vector store for the new width)",
        )
    return Finding("encoder", Status.OK, about)


def check_ranker(settings: Settings) -> Finding:
    """A configured trained model directory (``serving.model_dir``) has a readable manifest."""
    path = settings.serving.model_dir
    if path is None:
        return Finding("ranker", Status.OK, "untrained ranker (RECSTREAM_SERVING__MODEL_DIR unset)")
    from models.trained import ModelDirError, read_manifest

    try:
        version = read_manifest(path).get("version", "?")
    except ModelDirError as exc:
        return Finding(
            "ranker",
            Status.FAIL,
            _short(exc),
            "point RECSTREAM_SERVING__MODEL_DIR at a directory written by `recstream train`, "
            "or unset it to serve the untrained ranker",
        )
    return Finding("ranker", Status.OK, f"trained model {version} at {path}")


def check_gpu(enc: EncoderSettings) -> Finding:
    """Whether torch sees a CUDA GPU, against what ``encoder.device`` asks for."""
    try:
        import torch
    except ImportError:
        return Finding("gpu", Status.WARN, "torch is not installed", WORKER_EXTRA)
    from models.encoder import resolve_precision

    cuda = torch.version.cuda
    build = f"torch {torch.__version__}, " + (f"CUDA {cuda}" if cuda else "a CPU-only build")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
        if enc.device == "cpu":
            return Finding("gpu", Status.OK, f"{gpu} present but RECSTREAM_DEVICE=cpu; {build}")
        precision = resolve_precision(enc.precision, "cuda")
        return Finding("gpu", Status.OK, f"the encoder runs on {gpu} in {precision}; {build}")
    if enc.device == "cuda":
        fix = (
            "install the CUDA build of the same torch release"
            if not cuda
            else "check the driver (nvidia-smi) and that the container sees the GPU"
        )
        return Finding(
            "gpu",
            Status.FAIL,
            f"RECSTREAM_DEVICE=cuda but torch sees no CUDA GPU ({build})",
            f"{fix}; or set RECSTREAM_DEVICE=auto to run on the CPU",
        )
    precision = resolve_precision(enc.precision, "cpu")
    return Finding(
        "gpu", Status.OK, f"no CUDA GPU: the encoder runs on the CPU in {precision}; {build}"
    )
