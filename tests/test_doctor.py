"""`recstream doctor`: each check against the real thing (embedded broker, Qdrant Edge, the packaged
encoder), its failures named with a fix, and the command's exit codes and JSON."""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from clirun import run_cli
from confluent_kafka.admin import AdminClient
from qdrant_client import QdrantClient, models

from infra.broker import EmbeddedBroker, free_port
from infra.doctor import (
    Status,
    check_broker,
    check_collections,
    check_encoder,
    check_gpu,
    check_ranker,
    check_topics,
    check_vector_store,
    exit_code,
    run_checks,
)
from infra.kafka import confluent_config, provision_topics
from infra.settings import Settings, load_settings
from infra.vectors import VectorStore
from infra.vectors.edge import EdgeVectorStore
from infra.vectors.server import QdrantServerStore
from schemas.topics import ALL_TOPICS, CATALOG, FORGET, RECOMMENDATIONS, USER_UPDATES, TopicSpec

pytestmark = [
    # qdrant-client's local mode ignores the payload indexes ensure_collection creates, and says so.
    pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning"),
    # Its version check, in a thread, warns about the unreachable server of one test later on.
    pytest.mark.filterwarnings("ignore:Failed to obtain server version:UserWarning"),
]

RECSTREAM = [str(Path(sys.executable).parent / "recstream")]
CHECKS = ["settings", "versions", "broker", "topics", "vector-store", "encoder", "ranker", "gpu"]
DIM = 384  # the packaged all-MiniLM-L6-v2, and vectors.dim's default


def _edge_collections(settings: Settings, dims: dict[str, int]) -> None:
    """Create Qdrant Edge collections under the settings' data dir, as a worker would."""
    store = EdgeVectorStore(settings.vectors_dir)
    for name, dim in dims.items():
        store.ensure_collection(name, dim)
    store.close()


def _doctor(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`.venv/bin/recstream doctor ARGS` in a child process with only these RECSTREAM_* vars."""
    return run_cli(["doctor", *args], env=env, entry=RECSTREAM)


def _by_check(settings: Settings, timeout: float = 5.0) -> dict[str, tuple[Status, str, str]]:
    return {f.check: (f.status, f.message, f.fix) for f in run_checks(settings, timeout)}


# --- a healthy deployment ------------------------------------------------------------------------


def test_healthy_embedded_deployment_passes_every_check(settings: Settings) -> None:
    """Broker with every topic, Edge collections at 384-d cosine and the packaged encoder: all
    checks OK (the GPU one says the CPU is used on a machine without CUDA), exit code 0."""
    _edge_collections(settings, {"items": DIM, "reviews": DIM})
    findings = run_checks(settings, 5.0)
    by = {f.check: f for f in findings}
    assert [f.check for f in findings] == CHECKS
    assert {f.check for f in findings if f.status is Status.OK} == set(CHECKS[2:])
    assert by["settings"].status is Status.INFO
    assert "kafka.bootstrap_servers" in by["settings"].message
    assert by["versions"].status is Status.INFO
    assert f"torch {torch.__version__}" in by["versions"].message
    assert by["broker"].message.startswith(f"{settings.kafka.bootstrap_servers} answered in")
    assert by["topics"].message.startswith("all 7 topics exist with 1 partition(s)")
    assert by["vector-store"].message == (
        f"Qdrant Edge {settings.vectors_dir}: items, reviews ok (384-d, cosine)"
    )
    assert by["encoder"].message.startswith("all-MiniLM-L6-v2 (bert, 384-d, ")
    if not torch.cuda.is_available():
        assert by["gpu"].message.startswith("no CUDA GPU: the encoder runs on the CPU")
    assert exit_code(findings) == 0


def test_cli_exits_zero_against_a_healthy_stack(settings: Settings) -> None:
    """`recstream doctor` configured only by RECSTREAM_* variables prints one line per check,
    no fix lines, a tally of 6 OK, and exits 0."""
    _edge_collections(settings, {"items": DIM, "reviews": DIM})
    env = {
        "RECSTREAM_BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "RECSTREAM_KAFKA__PARTITIONS": "1",
        "RECSTREAM_DATA_DIR": str(settings.data_dir),
    }
    result = _doctor(env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[1] for line in lines[:-1]] == CHECKS
    assert lines[2].startswith(f"OK    broker        {settings.kafka.bootstrap_servers} answered")
    assert "fix:" not in result.stdout
    assert lines[-1] == "6 OK, 0 WARN, 0 FAIL"
    assert "Traceback" not in result.stderr


# --- broker and topics ---------------------------------------------------------------------------


def test_closed_port_fails_the_broker_check_naming_the_address(tmp_path: Path) -> None:
    """With nothing listening at the bootstrap address, the broker check FAILs naming it and
    why, topics are skipped, the command exits 1 within the timeout and prints no traceback."""
    address = f"127.0.0.1:{free_port()}"
    env = {"RECSTREAM_BOOTSTRAP_SERVERS": address, "RECSTREAM_DATA_DIR": str(tmp_path)}
    result = _doctor("--timeout", "1", env=env)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    broker = next(i for i, line in enumerate(lines) if line.startswith("FAIL  broker"))
    assert (
        f"no Kafka broker answered at {address}: Connect to ipv4#{address} failed" in lines[broker]
    )
    assert "Connection refused" in lines[broker]
    assert "fix: start the broker (`recstream up`" in lines[broker + 1]
    assert any(line.startswith("SKIP  topics") for line in lines)
    assert lines[-1].endswith("1 FAIL")
    assert "Traceback" not in result.stdout + result.stderr


def test_a_listener_that_never_answers_fails_after_the_timeout() -> None:
    """A port that accepts connections but never answers Kafka requests FAILs once the timeout
    is spent, saying so, rather than hanging."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        start = time.perf_counter()
        finding, cluster = check_broker(load_settings(bootstrap_servers=address).kafka, 1.0)
        elapsed = time.perf_counter() - start
    assert (finding.status, cluster) == (Status.FAIL, None)
    # librdkafka may add the last request's failure after the timeout (": Failed to get ...")
    assert finding.message.startswith(f"no Kafka broker answered at {address} within 1 s")
    assert 1.0 <= elapsed < 3.0


def test_json_output_lists_every_check(tmp_path: Path) -> None:
    """`doctor --json` prints one JSON document with every check's status, message and fix, and
    an exit code that matches the process's."""
    env = {
        "RECSTREAM_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
        "RECSTREAM_DATA_DIR": str(tmp_path),
    }
    result = _doctor("--json", "--timeout", "1", env=env)
    report = json.loads(result.stdout)
    assert report["exit_code"] == result.returncode == 1
    assert [f["check"] for f in report["findings"]] == CHECKS
    assert all(set(f) == {"check", "status", "message", "fix"} for f in report["findings"])
    statuses = {f["check"]: f["status"] for f in report["findings"]}
    assert (statuses["broker"], statuses["topics"], statuses["encoder"]) == ("FAIL", "SKIP", "OK")


def test_a_deleted_topic_fails_the_topic_check_naming_it(settings: Settings) -> None:
    """With users.forget.v1 deleted, the topic check FAILs naming only it, and the fix says how
    to create it (a worker, or the kafka-topics command with its partitions and cleanup)."""
    admin = AdminClient(confluent_config(settings.kafka))
    admin.delete_topics([FORGET.name])[FORGET.name].result(timeout=10)
    deadline = time.monotonic() + 10
    while FORGET.name in admin.list_topics(timeout=5).topics and time.monotonic() < deadline:
        time.sleep(0.05)
    finding, cluster = check_broker(settings.kafka, 5.0)
    assert finding.status is Status.OK
    topics = check_topics(settings.kafka, cluster, 5.0)
    assert topics.status is Status.FAIL
    assert topics.message == f"missing: {FORGET.name}"
    assert "`recstream worker` creates missing topics" in topics.fix
    assert f"--topic {FORGET.name} --partitions 1" in topics.fix
    assert "--config cleanup.policy=delete" in topics.fix


def _provision(settings: Settings, wrong: dict[str, TopicSpec | int]) -> None:
    """Every topic, through the project's provisioning: a TopicSpec value replaces a topic's
    spec (another cleanup policy), an int gives it that many partitions."""
    for spec in ALL_TOPICS:
        changed = wrong.get(spec.name, spec)
        kafka = settings.kafka
        if isinstance(changed, int):
            kafka, changed = kafka.model_copy(update={"partitions": changed}), spec
        provision_topics(kafka, [changed])


def test_wrong_cleanup_and_internal_partitions_fail_with_fixes(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """A catalogue topic that is not compacted and an internal topic with other partitions than
    configured FAIL, each explained, with the kafka-configs command and the partitions setting."""
    settings = load_settings(
        data_dir=tmp_path, kafka={"bootstrap_servers": broker.bootstrap_servers, "partitions": 1}
    )
    _provision(settings, {CATALOG.name: dataclasses.replace(CATALOG, cleanup="delete"),
                          USER_UPDATES.name: 2})  # fmt: skip
    _, cluster = check_broker(settings.kafka, 5.0)
    topics = check_topics(settings.kafka, cluster, 5.0)
    assert topics.status is Status.FAIL
    assert f"{USER_UPDATES.name} has 2 partitions, RECSTREAM_KAFKA__PARTITIONS is 1" in (
        topics.message
    )
    assert f"{CATALOG.name} has cleanup.policy=delete, expected compact" in topics.message
    assert "RECSTREAM_KAFKA__PARTITIONS=2" in topics.fix
    assert f"--entity-name {CATALOG.name} --add-config cleanup.policy=compact" in topics.fix


def test_public_topic_with_other_partitions_only_warns(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """A public topic (recommendations.v1) with more partitions than configured is a WARN, not a
    FAIL: the worker re-keys what it reads, so the deployment still works."""
    settings = load_settings(
        data_dir=tmp_path, kafka={"bootstrap_servers": broker.bootstrap_servers, "partitions": 1}
    )
    _provision(settings, {RECOMMENDATIONS.name: 3})
    _, cluster = check_broker(settings.kafka, 5.0)
    topics = check_topics(settings.kafka, cluster, 5.0)
    assert topics.status is Status.WARN
    assert topics.message.startswith(f"{RECOMMENDATIONS.name} has 3 partitions")
    assert topics.fix == "set RECSTREAM_KAFKA__PARTITIONS=3 to match the cluster"


# --- vector store: the same cases on Qdrant Edge and qdrant-client's local mode ------------------


def _edge(tmp_path: Path) -> tuple[VectorStore, Callable[[str, int, str], None]]:
    def create(name: str, dim: int, distance: str) -> None:
        from qdrant_edge import Distance, EdgeConfig, EdgeShard, EdgeVectorParams

        (tmp_path / name).mkdir()
        params = EdgeVectorParams(size=dim, distance=getattr(Distance, distance))
        EdgeShard.create(str(tmp_path / name), EdgeConfig(vectors=params)).close()

    return EdgeVectorStore(tmp_path), create


def _server_local(tmp_path: Path) -> tuple[VectorStore, Callable[[str, int, str], None]]:
    client = QdrantClient(location=":memory:")

    def create(name: str, dim: int, distance: str) -> None:
        params = models.VectorParams(size=dim, distance=models.Distance(distance))
        client.create_collection(name, vectors_config=params)

    return QdrantServerStore(client), create


@pytest.mark.parametrize("backend", [_edge, _server_local], ids=["edge", "server-local"])
@pytest.mark.parametrize(
    ("items", "status", "message"),
    [
        (
            None,
            Status.OK,
            "x: reviews ok (384-d, cosine); items not created yet (a worker creates them at start)",
        ),
        ((DIM, "Cosine"), Status.OK, "x: items, reviews ok (384-d, cosine)"),
        ((128, "Cosine"), Status.FAIL, "x: 'items' holds 128-d vectors, vectors.dim is 384"),
        ((DIM, "Dot"), Status.FAIL, "x: 'items' uses Dot distance, recstream needs Cosine"),
    ],
    ids=["absent", "right", "wrong-size", "wrong-distance"],
)
def test_collection_schema_is_checked_on_both_backends(
    tmp_path: Path,
    backend: Callable[[Path], tuple[VectorStore, Callable[[str, int, str], None]]],
    items: tuple[int, str] | None,
    status: Status,
    message: str,
) -> None:
    """Both backends give the same verdict: an absent collection is fine (a worker creates it),
    one of another width or distance FAILs with a fix naming what to delete and `reencode`."""
    store, create = backend(tmp_path)
    create("reviews", DIM, "Cosine")
    if items is not None:
        create("items", *items)
    finding = check_collections(store, load_settings().vectors, "x")
    store.close()
    assert (finding.status, finding.message) == (status, message)
    if status is Status.FAIL:
        where = str(tmp_path / "items") if backend is _edge else "collection 'items'"
        assert finding.fix.startswith(f"with the workers stopped, delete {where}, then")
        assert "`recstream reencode LOG`" in finding.fix


def test_configured_edge_store_with_a_wrong_width_fails(tmp_path: Path) -> None:
    """Through the configured store (Qdrant Edge under the data dir), a 128-d items collection
    FAILs against the 384-d encoder."""
    settings = load_settings(data_dir=tmp_path)
    _edge_collections(settings, {"items": 128})
    finding = check_vector_store(settings, 2.0)
    assert finding.status is Status.FAIL
    assert finding.message == (
        f"Qdrant Edge {settings.vectors_dir}: 'items' holds 128-d vectors, vectors.dim is 384"
    )


def test_unreachable_qdrant_server_fails_naming_the_url(tmp_path: Path) -> None:
    """A Qdrant server URL where nothing listens FAILs naming the URL, with a fix to start the
    server or correct RECSTREAM_QDRANT_URL."""
    url = f"http://127.0.0.1:{free_port()}"
    finding = check_vector_store(load_settings(data_dir=tmp_path, qdrant_url=url), 1.0)
    assert finding.status is Status.FAIL
    assert finding.message.startswith(f"Qdrant server {url}: ")
    assert finding.fix == "start the Qdrant server or correct RECSTREAM_QDRANT_URL"


# --- encoder, ranker, GPU ------------------------------------------------------------------------


def _model_dir(path: Path, weights: bytes | None, hidden_size: int = DIM) -> Path:
    path.mkdir()
    (path / "config.json").write_text(
        json.dumps({"model_type": "bert", "hidden_size": hidden_size})
    )
    (path / "tokenizer.json").write_text("{}")
    if weights is not None:
        (path / "model.safetensors").write_bytes(weights)
    return path


def _safetensors(data_bytes: int, declared: int = 8) -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, declared]}})
    return len(header).to_bytes(8, "little") + header.encode() + b"\0" * data_bytes


@pytest.mark.parametrize(
    ("weights", "hidden", "expected"),
    [
        (None, DIM, "lacks weights (*.safetensors or pytorch_model.bin)"),
        (b"version https://git-lfs.github.com/spec/v1\n", DIM, "is a Git LFS pointer"),
        (_safetensors(4), DIM, "model.safetensors is truncated"),
        (_safetensors(8), 768, "it makes 768-d vectors but vectors.dim is 384"),
    ],
    ids=["no-weights", "lfs-pointer", "truncated", "other-width"],
)
def test_broken_model_directory_fails_the_encoder_check(
    tmp_path: Path, weights: bytes | None, hidden: int, expected: str
) -> None:
    """A model directory without weights, with a Git LFS pointer or truncated weights, or of
    another width than vectors.dim, FAILs saying which, without loading the model."""
    path = _model_dir(tmp_path / "model", weights, hidden)
    finding = check_encoder(load_settings(encoder_model=path))
    assert finding.status is Status.FAIL
    assert str(path) in finding.message
    assert expected in finding.message


def test_missing_model_directory_fails_and_a_valid_one_passes(tmp_path: Path) -> None:
    """RECSTREAM_ENCODER_MODEL naming no directory FAILs with the fix; a complete directory of
    the right width is OK and reported by its name and width."""
    missing = check_encoder(load_settings(encoder_model=tmp_path / "nope"))
    assert (missing.status, missing.message) == (
        Status.FAIL,
        f"model directory {tmp_path / 'nope'} does not exist",
    )
    assert missing.fix.startswith("set RECSTREAM_ENCODER_MODEL to a local directory")
    path = _model_dir(tmp_path / "mini", _safetensors(8))
    found = check_encoder(load_settings(encoder_model=path))
    assert (found.status, found.message) == (Status.OK, f"mini (bert, 384-d, 0 MB) at {path}")


def test_ranker_dir_without_manifest_fails(tmp_path: Path) -> None:
    """RECSTREAM_SERVING__MODEL_DIR pointing at a directory `recstream train` did not write
    FAILs; unset, the untrained ranker is OK."""
    finding = check_ranker(load_settings(serving={"model_dir": tmp_path}))
    assert finding.status is Status.FAIL
    assert finding.message == f"{tmp_path} is not a model directory (no manifest.json)"
    assert check_ranker(load_settings()).status is Status.OK


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_requested_without_a_gpu_fails() -> None:
    """RECSTREAM_DEVICE=cuda on a machine where torch sees no GPU FAILs (the worker would fall
    back to the CPU); auto on the same machine is OK and says the CPU is used."""
    cuda = check_gpu(load_settings(device="cuda").encoder)
    assert cuda.status is Status.FAIL
    assert cuda.message.startswith("RECSTREAM_DEVICE=cuda but torch sees no CUDA GPU")
    assert cuda.fix.endswith("or set RECSTREAM_DEVICE=auto to run on the CPU")
    auto = check_gpu(load_settings(device="auto").encoder)
    assert auto.status is Status.OK
    assert "runs on the CPU" in auto.message


# --- command-line errors -------------------------------------------------------------------------


def test_bad_timeout_is_a_one_line_usage_error(tmp_path: Path) -> None:
    """`doctor --timeout 0` is rejected at parse time: exit 2, one stderr line, no traceback."""
    result = _doctor("--timeout", "0", env={"RECSTREAM_DATA_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "recstream doctor: error: argument --timeout: expected a positive number, not 0 "
        "(see recstream doctor --help)"
    ]


def test_invalid_setting_is_a_settings_failure(tmp_path: Path) -> None:
    """An invalid RECSTREAM_* value is reported as the settings check's FAIL, exit 1."""
    env = {"RECSTREAM_KAFKA__PARTITIONS": "0", "RECSTREAM_DATA_DIR": str(tmp_path)}
    result = _doctor("--json", env=env)
    assert result.returncode == 1
    (finding,) = json.loads(result.stdout)["findings"]
    assert (finding["check"], finding["status"]) == ("settings", "FAIL")
    assert finding["message"].startswith("invalid setting kafka.partitions:")
    assert "Traceback" not in result.stderr
