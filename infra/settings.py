"""One frozen, nested Settings object built from ``RECSTREAM_*`` variables (and an optional file).

Build it once at the entry point (:func:`load_settings`) and pass it down; nothing else reads the
environment. Nested fields use a double underscore: ``RECSTREAM_KAFKA__SECURITY_PROTOCOL``. The
names the design documents promise are also accepted at the top level:
``RECSTREAM_BOOTSTRAP_SERVERS``, ``RECSTREAM_QDRANT_URL``, ``RECSTREAM_ENCODER_MODEL``,
``RECSTREAM_DEVICE``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class KafkaSettings(BaseModel):
    """How to reach the Kafka cluster (or the embedded broker)."""

    model_config = _FROZEN

    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    partitions: int = Field(default=4, ge=1, le=1024)
    replication_factor: int = Field(default=1, ge=1, le=16)
    # librdkafka's default session timeout makes group joins take ~23 s on the embedded broker.
    session_timeout_ms: int = Field(default=6000, ge=1000)
    # The embedded broker holds an empty fetch for the whole wait, so keep it short there;
    # Apache Kafka answers as soon as data arrives, so a larger value (e.g. 500) costs nothing.
    fetch_max_wait_ms: int = Field(default=20, ge=1, le=10_000)
    # How long a worker's producer waits to batch messages. At 0 a busy worker writes one small
    # request per message; 2 ms gave 372 against 268 events/s (benchmarks/e2e.py --max) for a
    # p50 at 20 events/s of 37.4 against 36.3 ms (docs/performance.md).
    producer_linger_ms: int = Field(default=2, ge=0, le=1000)


class VectorSettings(BaseModel):
    """Where vectors live: embedded Qdrant Edge under the data dir, or a Qdrant server."""

    model_config = _FROZEN

    url: str | None = None
    api_key: SecretStr | None = None
    # CA bundle that signed a Qdrant server's certificate (an https URL under a private CA)
    tls_ca: Path | None = None
    # An unreachable store is retried with backoff, 0.05 s doubling up to this wait, forever
    # unless a deadline is set (infra/vectors/retry.py, docs/security.md).
    retry_max_wait_s: float = Field(default=5.0, ge=0.05, le=600.0)
    retry_deadline_s: float | None = Field(default=None, gt=0.0)
    dim: int = Field(default=384, ge=2, le=8192, description="must match the encoder's width")
    items_collection: str = "items"
    reviews_collection: str = "reviews"
    # HNSW of Qdrant Edge: recall@10 >= 0.95 with p99 < 1 ms at 100,000 items; near 1,000,000
    # items hnsw_ef=256 is needed (docs/vector-scale.md).
    hnsw_m: int = Field(
        default=16,
        ge=4,
        le=128,
        description="Edge HNSW edges per node, for collections created from now on",
    )
    hnsw_ef_construct: int = Field(
        default=100,
        ge=4,
        le=1000,
        description="Edge HNSW candidates per insertion while building, for new collections",
    )
    hnsw_ef: int = Field(
        default=64,
        ge=1,
        le=10_000,
        description="Edge HNSW candidates per query (at least the query's limit is used)",
    )
    # Up to this many available items, a recommend worker holds their vectors as one matrix
    # and finds candidates by an exact scan of it (infra/vectors/resident.py); above it, and
    # with 0, the store's own search answers.
    resident_max_items: int = Field(
        default=50_000,
        ge=0,
        le=10_000_000,
        description="items searched in memory by the ranker (0 = always ask the store)",
    )


class EncoderSettings(BaseModel):
    """The text encoder: model directory, device and batching."""

    model_config = _FROZEN

    model: Path | None = None  # None = the packaged all-MiniLM-L6-v2
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # None = 64 on the CPU, 1024 on CUDA (a GPU needs large batches: docs/encoder.md)
    batch_size: int | None = Field(default=None, ge=1, le=4096)
    max_length: int = Field(default=256, ge=8, le=512)
    max_wait_ms: int = Field(default=50, ge=1, le=10_000)
    # auto: bf16 on CUDA, fp32 on the CPU; int8 = dynamic quantisation of the linear layers (CPU)
    precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = "auto"
    threads: int | None = Field(default=None, ge=1, le=256)  # CPU threads; None = PyTorch's
    compile: bool = False  # torch.compile the model
    # processes tokenising ahead of a GPU; None = all cores but two beside a GPU, none on the CPU
    tokeniser_workers: int | None = Field(default=None, ge=0, le=64)


class RankingSettings(BaseModel):
    """Knobs of the untrained ranker (the defaults are what evaluation measured)."""

    model_config = _FROZEN

    k: int = Field(default=10, ge=1, le=200)
    candidates: int = Field(default=100, ge=1, le=2000)
    recent_items: int = Field(default=50, ge=1, le=500)
    behaviour_weight: float = Field(default=0.7, ge=0.0, le=1.0)
    half_life_events: float = Field(default=5.0, gt=0.0)
    covisit_weight: float = Field(default=0.35, ge=0.0)
    mmr_lambda: float = Field(default=0.8, ge=0.0, le=1.0)
    exclude_seen: bool = True


class ServingSettings(BaseModel):
    """Which trained model the recommend agent serves, and how often it looks for a new one."""

    model_config = _FROZEN
    model_dir: Path | None = None  # None = the untrained ranker
    watch_s: float = Field(
        default=5.0, ge=0.0, description="seconds between checks of model_dir; 0 = never reload"
    )
    # The latest list sent per user, kept (as its bytes) by the worker that owns the user for
    # GET /users/{id}/recommendations; older users' lists are computed again on request.
    latest_lists: int = Field(default=10_000, ge=0, le=10_000_000)


class StreamSettings(BaseModel):
    """Faust worker settings."""

    model_config = _FROZEN

    app_id: str = "recstream"
    batch_size: int = Field(default=500, ge=1, le=100_000)
    batch_wait_ms: int = Field(default=5, ge=1, le=10_000)
    # Messages buffered per partition before Faust pauses fetching it: with agents that await
    # each batch, the bound on what a slow step (the encoder) lets pile up in memory.
    buffer_maxsize: int = Field(default=4096, ge=1, le=1_000_000)
    # Ranking runs behind ingestion: the recommend agent writes each batch to the tables and
    # leaves its users waiting for a fresh list; a ranking task takes up to ``rank_round`` of
    # them at a time. When events come faster than lists can be ranked, a waiting user's further
    # events join the wait, so one list answers them all; at ``rank_backlog`` waiting users the
    # agent stops taking batches until the ranking catches up (memory stays bounded).
    rank_round: int = Field(default=256, ge=1, le=100_000)
    rank_backlog: int = Field(default=20_000, ge=1, le=10_000_000)
    # While the agent is behind on its input (its newest update was written more than 0.25 s
    # ago), ranking waits until the oldest waiting user has waited this long, so the worker
    # spends its time absorbing events and each list answers more of them; 0 ranks at once.
    rank_max_delay_ms: int = Field(default=5_000, ge=0, le=600_000)
    # A worker of role ``all`` applies a behaviour or forget event to the user state itself when
    # it holds the user's partition of the user-updates topic, instead of sending the update
    # through that topic to its own user-state agent (one broker hop instead of two). False
    # sends every update through the topic, as workers of split roles always do.
    direct_updates: bool = True
    # The consumer hands a fetched message to its stream in place when the stream's queue has
    # room, instead of through Faust's four tasks per message (streams/transport.py,
    # TunedConsumer._drain_messages). Off by default: at 500 events/s it lowered p99 (99.5 to
    # 149.2 ms against 174.8 to 182.1), but under ``e2e.py --max`` the worker then waited on its
    # fetches and sustained throughput fell by 9 to 23 % (docs/performance.md).
    direct_hand_over: bool = False
    # Garbage collection (streams/heap.py): every ``gc_freeze_s`` seconds the worker collects
    # what it made since the last time and moves the survivors out of the collector's scans
    # (0: leave CPython's collector as it is); every ``gc_full_s`` seconds it walks the whole
    # heap once (0: never after start).
    gc_freeze_s: float = Field(default=10.0, ge=0, le=86_400)
    gc_full_s: float = Field(default=3_600.0, ge=0, le=604_800)
    web_port: int = Field(default=6066, ge=0, le=65535)
    web_host: str = "127.0.0.1"
    # The URL other workers use to reach this one's web server (REST requests for users whose
    # partitions this worker owns are forwarded here). None: http://<web_host>:<web_port>, with
    # the machine's host name when web_host listens on every interface.
    advertised_url: str | None = None
    # Where the worker's tables live. "rocksdb": one RocksDB database per table under
    # <data_dir>/faust/<role>, so a restart reads only the changelog written since the last commit
    # (streams/store.py). "memory": in memory, rebuilt from the whole changelog at every start.
    table_store: Literal["rocksdb", "memory"] = "rocksdb"


class PrivacySettings(BaseModel):
    """Personal data: scrubbing review text, and pseudonymising user ids at the producer."""

    model_config = _FROZEN

    # Replace e-mail addresses, phone and card numbers in review text with tokens before the text
    # is encoded (vectors, user-state snippets) and before it is archived (schemas/privacy.py).
    scrub_pii: bool = True
    # HMAC-SHA256 key: BehaviorProducer publishes pseudonymise(user_id, key) instead of the raw
    # id, and RecommendationConsumer maps a raw id it filters by. None = ids pass through.
    pseudonym_key: SecretStr | None = None

    @model_validator(mode="after")
    def _key_not_empty(self) -> PrivacySettings:
        if self.pseudonym_key is not None and not self.pseudonym_key.get_secret_value():
            raise ValueError("pseudonym_key must not be empty; leave it unset to keep raw ids")
        return self

    def pseudonym_key_bytes(self) -> bytes | None:
        """The pseudonym key as bytes (UTF-8), or None when ids pass through."""
        key = self.pseudonym_key
        return None if key is None else key.get_secret_value().encode("utf-8")


class ConsoleSettings(BaseModel):
    """The web console (``recstream console``, and the one ``recstream demo`` starts)."""

    model_config = _FROZEN

    host: str = "127.0.0.1"  # loopback: the console publishes events, so it is not exposed
    port: int = Field(default=8088, ge=0, le=65535)  # 0 = any free port
    # Workers whose GET /metrics the operations page reads. Empty: this machine's worker at
    # stream.web_host:stream.web_port.
    worker_urls: list[str] = []
    # Where `recstream eval --out` results are looked for (any results.json up to 3 levels down).
    eval_dir: Path = Path(".data") / "eval"
    # Recent dead letters kept with their original bytes for the operations page.
    dead_letters_kept: int = Field(default=100, ge=1, le=100_000)

    def metrics_urls(self, stream: StreamSettings) -> list[str]:
        """The worker base URLs to read, without a trailing slash."""
        if self.worker_urls:
            return [url.rstrip("/") for url in self.worker_urls]
        if stream.web_port == 0:
            return []
        host = "127.0.0.1" if stream.web_host in ("0.0.0.0", "::", "") else stream.web_host
        return [f"http://{host}:{stream.web_port}"]


class Settings(BaseSettings):
    """Every setting recstream reads, frozen once built."""

    model_config = SettingsConfigDict(
        env_prefix="RECSTREAM_",
        env_nested_delimiter="__",
        frozen=True,
        extra="ignore",
    )

    data_dir: Path = Path(".data")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_json: bool = False
    kafka: KafkaSettings = KafkaSettings()
    vectors: VectorSettings = VectorSettings()
    encoder: EncoderSettings = EncoderSettings()
    ranking: RankingSettings = RankingSettings()
    stream: StreamSettings = StreamSettings()
    serving: ServingSettings = ServingSettings()
    privacy: PrivacySettings = PrivacySettings()
    console: ConsoleSettings = ConsoleSettings()
    # Short top-level aliases named in the design documents.
    bootstrap_servers: str | None = None
    qdrant_url: str | None = None
    encoder_model: Path | None = None
    device: Literal["auto", "cpu", "cuda"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _fold_aliases(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        moves = {
            "bootstrap_servers": ("kafka", "bootstrap_servers"),
            "qdrant_url": ("vectors", "url"),
            "encoder_model": ("encoder", "model"),
            "device": ("encoder", "device"),
        }
        data = dict(data)
        for alias, (section, field) in moves.items():
            value = data.get(alias)
            if value is None:
                continue
            nested = data.get(section)
            nested = (
                dict(nested)
                if isinstance(nested, dict)
                else (nested.model_dump() if isinstance(nested, BaseModel) else {})
            )
            nested[field] = value
            data[section] = nested
        return data

    @property
    def vectors_dir(self) -> Path:
        return self.data_dir / "qdrant"

    @property
    def archive_dir(self) -> Path:
        return self.data_dir / "archive"


def load_settings(env_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the one Settings object: environment, then ``env_file``, then explicit overrides."""
    if env_file is not None and not env_file.is_file():
        raise FileNotFoundError(f"settings file not found: {env_file}")
    return Settings(_env_file=env_file, **overrides)  # type: ignore[call-arg]
