"""Dependency failures and secrets: an unreachable vector store is waited out without loss, a
missing broker stops the worker with one line, an encoder failing on one text dead-letters only
that text, and secrets stay out of every rendered log line while reaching the clients that need
them (Kafka SASL/TLS, Qdrant API key over TLS)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import httpx
import numpy as np
import pytest
import structlog
from clirun import run_cli
from pydantic import SecretStr
from qdrant_client.common.client_exceptions import ResourceExhaustedResponse
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse
from structlog.testing import capture_logs

from infra.broker import EmbeddedBroker, free_port
from infra.kafka import consumer_config, faust_broker_options, producer_config
from infra.logs import REDACTED, configure_logging, redact_secrets
from infra.metrics import Registry
from infra.settings import KafkaSettings, Settings, load_settings
from infra.vectors import VectorPoint, open_vector_store
from infra.vectors.cached import CachedStore
from infra.vectors.edge import EdgeVectorStore
from infra.vectors.retry import (
    GIVE_UPS,
    RECOVERIES,
    RETRIES,
    RetryingStore,
    VectorStoreUnavailable,
    is_transient,
)
from infra.vectors.server import QdrantServerStore
from models.encoder import EncodeError, TextEncoder
from schemas.events import DeadLetter
from schemas.internal import EncodeRequest
from schemas.topics import DEAD_LETTER, ENCODE_REQUESTS, USER_UPDATES
from streams.encode import EncodeStep
from streams.services import Services
from streams.sinks import Sinks

# qdrant-client checks the server version in a background thread and warns when nothing answers.
pytestmark = pytest.mark.filterwarnings("ignore:Failed to obtain server version:UserWarning")

DIM = 16
SASL_PASSWORD = "kafka-pw-5f1d9c"
API_KEY = "qdrant-key-a83e27"
PSEUDONYM_KEY = "pseudonym-key-77b0e4"


def _unit(n: int, seed: int = 3) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


# --- the metrics registry -------------------------------------------------------------------------


def test_registry_counts_by_name_and_labels_across_threads() -> None:
    """Counters are keyed by name and labels, survive 8 threads adding 1,000 each without losing
    an increment, show up in the snapshot, and one name cannot be both a counter and a gauge."""
    registry = Registry()

    def add() -> None:
        for _ in range(1000):
            registry.counter(RETRIES, op="upsert").inc()

    threads = [threading.Thread(target=add) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    registry.counter(RETRIES, op="count").inc(2)
    registry.gauge("recstream_queue_depth").set(5)
    assert registry.value(RETRIES, op="upsert") == 8000
    assert registry.value(RETRIES, op="never") == 0
    assert [(s.name, s.kind, s.labels, s.value) for s in registry.snapshot()] == [
        ("recstream_queue_depth", "gauge", (), 5.0),
        (RETRIES, "counter", (("op", "count"),), 2.0),
        (RETRIES, "counter", (("op", "upsert"),), 8000.0),
    ]
    with pytest.raises(ValueError, match="is a counter"):
        registry.gauge(RETRIES, op="upsert")
    with pytest.raises(ValueError, match="only goes up"):
        registry.counter(RETRIES, op="upsert").inc(-1)


# --- the vector store unavailable -----------------------------------------------------------------


def _raised(exc: BaseException, cause: BaseException | None = None) -> BaseException:
    """``exc`` as raised (from ``cause``), with its traceback and chain set."""
    try:
        raise exc from cause
    except BaseException as caught:  # noqa: BLE001 - returned to the test, whatever it is
        return caught


def _response(status: int) -> UnexpectedResponse:
    return UnexpectedResponse(status, "reason", b'{"status":{"error":"x"}}', httpx.Headers())


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ConnectionRefusedError(111, "Connection refused"), True),
        (ConnectionResetError(104, "Connection reset by peer"), True),
        (TimeoutError("timed out"), True),
        (OSError(113, "No route to host"), True),
        (ResponseHandlingException(httpx.ConnectError("All connection attempts failed")), True),
        (httpx.ReadTimeout("read timed out"), True),
        (_response(503), True),
        (_response(502), True),
        (_response(429), True),
        (ResourceExhaustedResponse("slow down", 2), True),
        (_response(400), False),
        (_response(404), False),
        (ValueError("collection holds 384-d vectors, not 16-d"), False),
        (PermissionError(13, "Permission denied"), False),
        (FileNotFoundError(2, "No such file or directory"), False),
        (
            ResponseHandlingException(
                _raised(
                    httpx.ConnectError("certificate verify failed"),
                    ssl.SSLCertVerificationError(1, "certificate verify failed"),
                )
            ),
            False,
        ),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_transient_errors_are_outages_and_the_rest_are_not(
    exc: BaseException, transient: bool
) -> None:
    """Refused or reset connections, timeouts, 5xx and 429 are waited out; a 4xx, a ValueError, a
    missing or forbidden path and a refused TLS certificate are not (waiting cannot fix them)."""
    assert is_transient(exc) is transient


def test_backoff_doubles_from_50_ms_to_the_cap_with_jitter_and_honours_retry_after() -> None:
    """Waits double from 0.05 s to the 5 s cap; jitter keeps each between half and all of that;
    a server's Retry-After of 7 s is waited in full."""
    edge = SimpleNamespace()
    top = RetryingStore(edge, jitter=lambda: 1.0)  # type: ignore[arg-type]
    low = RetryingStore(edge, jitter=lambda: 0.0)  # type: ignore[arg-type]
    expected = [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    assert [top.wait_s(n) for n in range(1, 10)] == pytest.approx(expected)
    assert [low.wait_s(n) for n in range(1, 10)] == pytest.approx([w / 2 for w in expected])
    assert top.wait_s(10_000) == 5.0  # no overflow after a long outage
    assert top.wait_s(1, ResourceExhaustedResponse("slow down", 7)) == 7.0


def test_qdrant_server_on_a_closed_port_is_retried_then_given_up_at_the_deadline(
    tmp_path: Path,
) -> None:
    """The real qdrant-client store aimed at a loopback port where nothing listens fails with an
    error classed as transient; RetryingStore with a 0.5 s deadline retries it several times,
    logging one warning and counting one retry each, then gives up with a clear error."""
    port = free_port()
    settings = load_settings(data_dir=tmp_path, vectors={"url": f"http://127.0.0.1:{port}"})
    backend = open_vector_store(settings)
    assert isinstance(backend, QdrantServerStore)
    with pytest.raises(ResponseHandlingException) as direct:
        backend.count("items")
    assert is_transient(direct.value)

    registry = Registry()
    store = RetryingStore(backend, deadline_s=0.5, registry=registry)
    start = time.monotonic()
    with capture_logs() as logs, pytest.raises(VectorStoreUnavailable) as gave_up:
        store.count("items")
    took = time.monotonic() - start
    store.close()

    warnings = _events(logs, "vector_store_unavailable")
    assert len(warnings) >= 3
    assert [w["attempt"] for w in warnings] == list(range(1, len(warnings) + 1))
    assert all(w["op"] == "count" and w["log_level"] == "warning" for w in warnings)
    assert all(0 < w["wait_s"] <= 0.5 for w in warnings)
    assert all("Connection refused" in w["error"] and "\n" not in w["error"] for w in warnings)
    assert registry.value(RETRIES, op="count") == len(warnings)
    assert registry.value(GIVE_UPS, op="count") == 1
    (final,) = _events(logs, "vector_store_gave_up")
    assert final["attempts"] == len(warnings) + 1
    assert 0.5 <= took < 3.0
    message = str(gave_up.value)
    assert message.startswith("vector store unavailable: count failed")
    assert f"{len(warnings) + 1} times" in message
    assert "Connection refused" in message
    assert isinstance(gave_up.value.__cause__, ResponseHandlingException)


class _FailsFirst:
    """A real store whose first ``failures`` calls raise ConnectionError, as a dropped server's
    would; every later call goes through."""

    def __init__(self, inner: Any, failures: int, error: type[Exception] = ConnectionError) -> None:
        self.inner, self.failures, self.error = inner, failures, error
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Callable[..., Any]:
        target = getattr(self.inner, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            if self.failures > 0:
                self.failures -= 1
                raise self.error(f"injected failure of {name}")
            return target(*args, **kwargs)

        return call


@pytest.fixture
def edge(tmp_path: Path) -> Iterator[EdgeVectorStore]:
    store = EdgeVectorStore(tmp_path / "qdrant")
    store.ensure_collection("items", DIM)
    yield store
    store.close()


def test_a_store_down_for_three_calls_loses_nothing_and_recovers_once(
    edge: EdgeVectorStore,
) -> None:
    """Over real Qdrant Edge, a store whose first 3 calls fail: the upsert is retried exactly 3
    times (waits 0.05, 0.1, 0.2 s, jittered), one recovery is logged, and afterwards all 100
    points are stored with their vectors and the queries return the exact nearest neighbours."""
    vectors = _unit(100)
    points = [VectorPoint(f"i{n}", vectors[n], {"n": n}) for n in range(100)]
    registry, waits = Registry(), []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        time.sleep(seconds)

    flaky = _FailsFirst(edge, failures=3)
    store = RetryingStore(flaky, registry=registry, sleep=sleep)  # type: ignore[arg-type]
    with capture_logs() as logs:
        for start in range(0, 100, 25):
            store.upsert("items", points[start : start + 25])
        queries = _unit(3, seed=9)
        hits = store.query_batch("items", list(queries), 5)

    assert flaky.calls[:5] == ["upsert"] * 5  # 3 failures, then the first batch, then the next
    assert registry.value(RETRIES, op="upsert") == 3
    assert sum(s.value for s in registry.snapshot() if s.name == RETRIES) == 3
    assert registry.value(RECOVERIES, op="upsert") == 1
    assert [w["attempt"] for w in _events(logs, "vector_store_unavailable")] == [1, 2, 3]
    for wait, ceiling in zip(waits, [0.05, 0.1, 0.2], strict=True):
        assert ceiling / 2 <= wait <= ceiling
    (recovered,) = _events(logs, "vector_store_recovered")
    assert (recovered["op"], recovered["attempts"]) == ("upsert", 4)
    assert recovered["seconds_down"] >= sum(waits) - 0.01

    assert store.count("items") == 100
    stored = store.retrieve("items", [p.key for p in points])
    assert sorted(stored) == sorted(p.key for p in points)
    for point in points:
        np.testing.assert_allclose(stored[point.key].vector, point.vector, atol=1e-6)
    for query, got in zip(queries, hits, strict=True):
        exact = np.argsort(-(vectors @ query))[:5]
        assert [h.key for h in got] == [f"i{n}" for n in exact]


def test_a_non_transient_error_is_raised_at_once_without_retrying(edge: EdgeVectorStore) -> None:
    """A ValueError from the store is raised on the first attempt: no retry, no log line, no
    count; the next call goes through to the real store."""
    registry = Registry()
    bad = _FailsFirst(edge, failures=1, error=ValueError)
    store = RetryingStore(bad, registry=registry, sleep=pytest.fail)  # type: ignore[arg-type]
    point = VectorPoint("i1", _unit(1)[0], {})
    with capture_logs() as logs, pytest.raises(ValueError, match="injected failure of upsert"):
        store.upsert("items", [point])
    assert bad.calls == ["upsert"]
    assert logs == []
    assert registry.snapshot() == []
    store.upsert("items", [point])
    assert store.count("items") == 1


def test_worker_services_cache_over_retrying_over_the_backend(tmp_path: Path) -> None:
    """A worker's store is the item cache over RetryingStore (with the configured cap and
    deadline) over the backend, and the collections were created through it."""
    settings = load_settings(
        data_dir=tmp_path,
        vectors={"dim": DIM, "retry_max_wait_s": 2.0, "retry_deadline_s": 30.0},
    )
    services = Services(settings)
    store = services.store()
    try:
        assert isinstance(store, CachedStore)
        assert isinstance(store.inner, RetryingStore)
        assert (store.inner.max_wait_s, store.inner.deadline_s) == (2.0, 30.0)
        assert isinstance(store.inner.inner, EdgeVectorStore)
        assert (store.count("items"), store.count("reviews")) == (0, 0)
    finally:
        services.close()


def test_worker_whose_store_stays_down_past_the_deadline_stops_with_one_error_line(
    tmp_path: Path, broker: EmbeddedBroker
) -> None:
    """A recommend worker against a live broker but a Qdrant URL where nothing listens logs a
    vector_store_unavailable warning per retry while opening the store, and with a 1 s deadline
    exits 1 with one "recstream: error: vector store unavailable" line and no traceback."""
    env = {
        "RECSTREAM_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
        "RECSTREAM_QDRANT_URL": f"http://127.0.0.1:{free_port()}",
        "RECSTREAM_VECTORS__RETRY_DEADLINE_S": "1",
        "RECSTREAM_KAFKA__PARTITIONS": "1",
    }
    result = run_cli(["worker", "--role", "recommend"], cwd=tmp_path, env=env, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    retries = [line for line in lines if "vector_store_unavailable" in line]
    assert len(retries) >= 3
    assert all("op=ensure_collection" in line for line in retries)
    errors = [line for line in lines if line.startswith("recstream: error:")]
    assert errors == [lines[-1]]
    assert errors[0].startswith(
        "recstream: error: vector store unavailable: ensure_collection failed"
    )


# --- the broker unreachable -----------------------------------------------------------------------


def test_worker_without_a_broker_stops_with_one_line_naming_the_address(tmp_path: Path) -> None:
    """`recstream worker` with nothing listening at the bootstrap address exits 1 after 10 s with
    one line naming that address, no traceback, and leaves no state behind."""
    address = f"127.0.0.1:{free_port()}"
    result = run_cli(
        ["worker", "--role", "all"],
        cwd=tmp_path,
        env={"RECSTREAM_BOOTSTRAP_SERVERS": address},
        timeout=60,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.strip().splitlines() == [
        f"recstream: error: no Kafka broker answered at {address} within 10 s"
    ]
    assert list(tmp_path.iterdir()) == []


# --- the encoder failing on one text --------------------------------------------------------------


class _Topic:
    """Records what a step sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, bytes, int | None]] = []

    def send_soon(self, *, key: bytes, value: bytes, partition: int | None = None) -> None:
        self.sent.append((key, value, partition))


class _RejectsOne:
    """The real encoder, except that any batch holding ``poison`` fails as the encoder does."""

    def __init__(self, inner: TextEncoder, poison: str) -> None:
        self.inner, self.poison = inner, poison
        self.dim, self.version = inner.dim, inner.version

    def encode(self, texts: list[str]) -> np.ndarray:
        if self.poison in texts:
            raise EncodeError(f"cannot encode a text of {len(self.poison)} characters (test)")
        return self.inner.encode(texts)


def test_an_encoder_failing_on_one_text_dead_letters_that_text_only(tmp_path: Path) -> None:
    """With the real MiniLM encoder and Edge store: when a batch of four fails because of one
    text, the three others are encoded one by one and stored with their own vectors, and exactly
    one dead letter carries the failing request's original bytes, offset and reason."""
    encoder = TextEncoder(device="cpu")
    store = EdgeVectorStore(tmp_path / "qdrant")
    store.ensure_collection("items", encoder.dim)
    store.ensure_collection("reviews", encoder.dim)
    texts = {
        "a": "Nylon strings for classical guitar",
        "b": "A capo that clamps any neck",
        "poison": "A text the encoder cannot take",
        "c": "Medium picks that grip well",
    }
    updates, dead = _Topic(), _Topic()
    step = EncodeStep(
        encoder=_RejectsOne(encoder, texts["poison"]),  # type: ignore[arg-type]
        store=store,
        items_collection="items",
        reviews_collection="reviews",
        sinks=Sinks({USER_UPDATES.name: updates, DEAD_LETTER.name: dead}),
        executor=ThreadPoolExecutor(1),
        partitions=1,
    )
    batch = []
    for offset, (item, text) in enumerate(texts.items(), start=40):
        req = EncodeRequest(
            event_id=f"e-{item}", ts=1, received_ms=1, kind="item", item_id=item, text=text
        )
        raw = req.model_dump_json().encode()
        message = SimpleNamespace(topic=ENCODE_REQUESTS.name, partition=2, offset=offset, value=raw)
        batch.append((req, message))
    try:
        with capture_logs() as logs:
            summary = asyncio.run(step.run(batch))
        assert (summary["encoded"], summary["failed"]) == (3, 1)
        assert len(_events(logs, "batch_encode_failed")) == 1
        stored = store.retrieve("items", list(texts))
        assert sorted(stored) == ["a", "b", "c"]
        for item in ("a", "b", "c"):
            np.testing.assert_allclose(
                stored[item].vector, encoder.encode([texts[item]])[0], atol=1e-5
            )
        assert len(dead.sent) == 1
        key, value, _ = dead.sent[0]
        letter = DeadLetter.model_validate_json(value)
        assert key == ENCODE_REQUESTS.name.encode()
        assert (letter.stage, letter.topic, letter.partition, letter.offset) == (
            "encode-text",
            ENCODE_REQUESTS.name,
            2,
            42,
        )
        assert (letter.error_type, letter.error) == (
            "EncodeError",
            "cannot encode a text of 30 characters (test)",
        )
        assert base64.b64decode(letter.payload_b64) == batch[2][1].value
        notice = json.loads(updates.sent[-1][1])
        assert notice["item_ids"] == ["a", "b", "c"]
    finally:
        store.close()
        encoder.close()


# --- secrets --------------------------------------------------------------------------------------


def test_redaction_masks_secret_keys_at_any_depth_and_secretstr_values() -> None:
    """The log processor masks the values of password/secret/token/api-key keys, inside nested
    dicts and lists too, and any SecretStr; other keys (tokens, item_key) and the logged dict
    itself are left as they were."""
    config = {"bootstrap.servers": "k:9093", "sasl.password": SASL_PASSWORD}
    log = structlog.get_logger("test")
    with capture_logs(processors=[redact_secrets]) as logs:
        log.info(
            "connecting",
            config=config,
            sasl_password=SASL_PASSWORD,
            api_key=SecretStr(API_KEY),
            apiKey=API_KEY,
            auth_token="t-1",
            headers=[{"api-key": API_KEY, "accept": "json"}],
            pseudonym_key=PSEUDONYM_KEY,
            note=SecretStr(PSEUDONYM_KEY),
            tokens=12,
            item_key="i1",
            unset_password=None,
        )
    (entry,) = logs
    assert entry["config"] == {"bootstrap.servers": "k:9093", "sasl.password": REDACTED}
    assert config["sasl.password"] == SASL_PASSWORD  # the caller's dict is not changed
    for key in ("sasl_password", "api_key", "apiKey", "auth_token", "pseudonym_key", "note"):
        assert entry[key] == REDACTED, key
    assert entry["headers"] == [{"api-key": REDACTED, "accept": "json"}]
    assert (entry["tokens"], entry["item_key"], entry["unset_password"]) == (12, "i1", None)


def _secret_settings(tmp_path: Path, **kafka: Any) -> Settings:
    privacy = {"pseudonym_key": PSEUDONYM_KEY} if "privacy" in Settings.model_fields else {}
    return load_settings(
        data_dir=tmp_path,
        kafka={
            "bootstrap_servers": "kafka-1.internal:9093",
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": "recstream",
            "sasl_password": SASL_PASSWORD,
            **kafka,
        },
        vectors={"url": "https://qdrant.internal:6333", "api_key": API_KEY},
        **({"privacy": privacy} if privacy else {}),
    )


@pytest.fixture
def rendered_logs() -> Iterator[Callable[[bool], io.StringIO]]:
    """Configure logging as an entry point does, rendering into a buffer; restore afterwards."""
    saved = dict(structlog.get_config())
    saved["processors"] = list(saved["processors"])

    def configure(json_lines: bool) -> io.StringIO:
        configure_logging("debug", json=json_lines)
        out = io.StringIO()
        structlog.configure(
            logger_factory=structlog.PrintLoggerFactory(file=out),
            cache_logger_on_first_use=False,  # loggers cached on a test buffer would outlive it
        )
        return out

    yield configure
    structlog.configure(**saved)


@pytest.mark.parametrize("json_lines", [False, True], ids=["console", "json"])
def test_secrets_appear_in_no_dump_and_no_rendered_log_line(
    tmp_path: Path, json_lines: bool, rendered_logs: Callable[[bool], io.StringIO]
) -> None:
    """With the Kafka password, the Qdrant API key and the pseudonym key set, none of them is in
    repr/str of Settings, its JSON dump, or the output of the configured renderer when the
    settings, the librdkafka configs and the Faust broker options are logged."""
    settings = _secret_settings(tmp_path)
    secrets = [SASL_PASSWORD, API_KEY]
    if "privacy" in Settings.model_fields:
        secrets.append(PSEUDONYM_KEY)
    assert settings.kafka.sasl_password is not None
    assert settings.kafka.sasl_password.get_secret_value() == SASL_PASSWORD
    dumps = [repr(settings), str(settings), settings.model_dump_json(), str(settings.model_dump())]
    out = rendered_logs(json_lines)
    log = structlog.get_logger("recstream.test")
    log.info("worker_settings", settings=settings, kafka=settings.kafka, vectors=settings.vectors)
    log.info("kafka_clients", producer=producer_config(settings.kafka))
    log.debug("kafka_consumer", **consumer_config(settings.kafka, "recstream"))
    log.info("faust_options", **faust_broker_options(settings.kafka))
    rendered = out.getvalue()
    assert len(rendered.splitlines()) == 4
    assert "kafka-1.internal:9093" in rendered
    assert REDACTED in rendered
    for text in [*dumps, rendered]:
        for secret in secrets:
            assert secret not in text


def test_worker_start_at_debug_level_logs_no_secret(tmp_path: Path) -> None:
    """A worker started at debug level against an unreachable SASL_SSL cluster, with every secret
    set, reports the address and exits 1, and no secret is in anything it wrote."""
    address = f"127.0.0.1:{free_port()}"
    env = {
        "RECSTREAM_BOOTSTRAP_SERVERS": address,
        "RECSTREAM_LOG_LEVEL": "debug",
        "RECSTREAM_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
        "RECSTREAM_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
        "RECSTREAM_KAFKA__SASL_USERNAME": "recstream",
        "RECSTREAM_KAFKA__SASL_PASSWORD": SASL_PASSWORD,
        "RECSTREAM_VECTORS__API_KEY": API_KEY,
        "RECSTREAM_PRIVACY__PSEUDONYM_KEY": PSEUDONYM_KEY,
    }
    result = run_cli(["worker"], cwd=tmp_path, env=env, timeout=60)
    assert result.returncode == 1
    assert f"no Kafka broker answered at {address}" in result.stderr
    assert "Traceback" not in result.stderr
    for secret in (SASL_PASSWORD, API_KEY, PSEUDONYM_KEY):
        assert secret not in result.stderr + result.stdout


# --- TLS: Kafka and Qdrant ------------------------------------------------------------------------


_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _signed(name: str, cn: str, usage: str, alt: str | None, cwd: Path) -> None:
    """``name``.pem and ``name``.key: an EC certificate for ``cn`` signed by ca.pem."""
    ext = cwd / f"{name}.ext"
    lines = ["basicConstraints=CA:FALSE", f"extendedKeyUsage={usage}"]
    ext.write_text("\n".join([*lines, *([f"subjectAltName={alt}"] if alt else [])]) + "\n")
    key, csr, pem = f"{name}.key", f"{name}.csr", f"{name}.pem"
    _openssl("req", "-new", *_EC, "-keyout", key, "-out", csr, "-subj", f"/CN={cn}", cwd=cwd)
    sign = ["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2"]
    _openssl("x509", "-req", "-in", csr, *sign, "-out", pem, "-extfile", ext.name, cwd=cwd)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private CA (ca.pem), a server certificate for 127.0.0.1 and a client certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make test certificates")
    cwd = tmp_path_factory.mktemp("pki")
    ca = ["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=recstream-test-ca"]
    ca_ext = ["basicConstraints=critical,CA:TRUE", "keyUsage=critical,keyCertSign,cRLSign"]
    _openssl(
        "req", "-x509", "-new", *_EC, *ca, *(a for e in ca_ext for a in ("-addext", e)), cwd=cwd
    )
    _signed("server", "127.0.0.1", "serverAuth", "IP:127.0.0.1", cwd)
    _signed("client", "recstream-client", "clientAuth", None, cwd)
    return cwd


def test_kafka_sasl_ssl_settings_reach_librdkafka_and_faust(pki: Path, tmp_path: Path) -> None:
    """SASL_SSL with a CA, a client certificate and a key gives librdkafka its security, SASL
    and ssl.*.location keys (the password among them; librdkafka accepts the whole config and
    loads the files), Faust SASL_SSL credentials whose TLS context trusts the CA, and a logged
    copy of the config without the password."""
    import faust
    from confluent_kafka import Producer
    from faust.types.auth import AuthProtocol, SASLMechanism

    files = {
        "ssl_cafile": pki / "ca.pem",
        "ssl_certfile": pki / "client.pem",
        "ssl_keyfile": pki / "client.key",
    }
    kafka = _secret_settings(tmp_path, **files).kafka
    expected = {
        "bootstrap.servers": "kafka-1.internal:9093",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "recstream",
        "sasl.password": SASL_PASSWORD,
        "ssl.ca.location": str(pki / "ca.pem"),
        "ssl.certificate.location": str(pki / "client.pem"),
        "ssl.key.location": str(pki / "client.key"),
    }
    producer = producer_config(kafka)
    consumer = consumer_config(kafka, "recstream")
    assert {k: producer[k] for k in expected} == expected
    assert {k: consumer[k] for k in expected} == expected
    assert consumer["group.id"] == "recstream"

    local = KafkaSettings(**{**kafka.model_dump(), "bootstrap_servers": f"127.0.0.1:{free_port()}"})
    Producer(producer_config(local)).flush(0)  # raises KafkaException on a key or file it rejects

    options = faust_broker_options(kafka)
    assert options["broker"] == "kafka://kafka-1.internal:9093"
    creds = options["broker_credentials"]
    assert isinstance(creds, faust.SASLCredentials)
    assert (creds.username, creds.password) == ("recstream", SASL_PASSWORD)
    assert (creds.mechanism, creds.protocol) == (SASLMechanism.SCRAM_SHA_512, AuthProtocol.SASL_SSL)
    context = creds.ssl_context
    assert context is not None
    assert (context.verify_mode, context.check_hostname) == (ssl.CERT_REQUIRED, True)
    subjects = [str(cert["subject"]) for cert in context.get_ca_certs()]
    assert any("recstream-test-ca" in subject for subject in subjects)
    assert SASL_PASSWORD not in repr(creds)

    with capture_logs(processors=[redact_secrets]) as logs:
        structlog.get_logger("test").info("kafka_client", config=producer, credentials=creds)
    assert logs[0]["config"]["sasl.password"] == REDACTED
    assert SASL_PASSWORD not in repr(logs)
    assert producer["sasl.password"] == SASL_PASSWORD


class _QdrantCount(BaseHTTPRequestHandler):
    """Answers Qdrant's count call with 7 points and remembers the API key it was sent."""

    api_keys: ClassVar[list[str | None]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).api_keys.append(self.headers.get("api-key"))
        body = json.dumps({"result": {"count": 7}, "status": "ok", "time": 0.0}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


@pytest.fixture
def https_qdrant(pki: Path) -> Iterator[str]:
    """An HTTPS endpoint on loopback, certified by the test CA, that answers Qdrant's count call
    (no Qdrant server binary is installed; the TLS handshake and headers are what is tested)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki / "server.pem", pki / "server.key")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _QdrantCount)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _QdrantCount.api_keys = []
    yield f"https://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_qdrant_over_tls_trusts_the_configured_ca_only(
    https_qdrant: str, pki: Path, tmp_path: Path
) -> None:
    """With vectors.tls_ca naming the private CA, the store reaches the https server and sends
    the API key; without it the certificate is refused, and RetryingStore raises that at once
    instead of retrying (a setup error, not an outage). A missing CA file is a clear error."""
    settings = load_settings(
        data_dir=tmp_path,
        vectors={"url": https_qdrant, "api_key": API_KEY, "tls_ca": pki / "ca.pem"},
    )
    trusted = open_vector_store(settings)
    assert trusted.count("items") == 7
    assert _QdrantCount.api_keys == [API_KEY]
    trusted.close()

    registry = Registry()
    untrusted = RetryingStore(
        QdrantServerStore.from_url(https_qdrant, api_key=API_KEY, timeout=5), registry=registry
    )
    with pytest.raises(ResponseHandlingException, match="CERTIFICATE_VERIFY_FAILED"):
        untrusted.count("items")
    assert registry.snapshot() == []
    assert _QdrantCount.api_keys == [API_KEY]  # the key never left over the refused connection
    untrusted.close()

    missing = tmp_path / "nope.pem"
    with pytest.raises(FileNotFoundError, match=r"nope\.pem"):
        QdrantServerStore.from_url(https_qdrant, tls_ca=missing)


# --- loopback binding -----------------------------------------------------------------------------


def test_faust_web_server_binds_loopback_unless_configured(tmp_path: Path) -> None:
    """The worker's Faust app binds its web server to 127.0.0.1 by default, and to the address
    stream.web_host names when set."""
    from streams.topology import create_app

    assert Settings().stream.web_host == "127.0.0.1"
    default = create_app(load_settings(data_dir=tmp_path), "all")
    assert default.conf.web_bind == "127.0.0.1"
    exposed = create_app(load_settings(data_dir=tmp_path, stream={"web_host": "0.0.0.0"}), "all")
    assert exposed.conf.web_bind == "0.0.0.0"
