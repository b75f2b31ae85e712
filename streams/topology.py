"""The whole pipeline on one screen: topics -> agents -> tables -> sinks, per worker role.

```
behavior.events.v1 ─┐                            ┌─> recstream.user-updates.v1 ─┐
catalog.items.v1  ──┼─> [validate-input] ────────┤                              v
users.forget.v1   ──┘     │ invalid              │                   [update-user-state]
                          v                      v                     tables: users,
                   dead-letter.v1   recstream.encode-requests.v1       covisit, popularity
                                                 │                              │
                                           [encode-text] ─> vector store        v
                                                 └─> recstream.user-updates.v1  recommendations.v1
```
Roles: ``ingest`` runs validate-input, ``encoder`` runs encode-text, ``recommend`` runs
update-user-state, ``all`` runs every agent in one worker. In ``all``, validate-input applies the
updates of the users whose user-updates partition the worker holds to the user state itself,
without the topic (``stream.direct_updates``; see :class:`streams.user_state.LocalUpdates`).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, cast

import faust
import structlog

from infra.kafka import faust_broker_options
from infra.settings import Settings
from infra.vectors.cached import CachedStore
from models.state import UserState
from schemas.topics import ALL_TOPICS, ENCODE_REQUESTS, INPUT_TOPICS, USER_UPDATES
from streams.encode import EncodeStep, encode_text
from streams.heap import HeapKeeper
from streams.ingest import STEP as INGEST_STEP
from streams.ingest import ingest
from streams.observe import serving, watch_consumer
from streams.services import Services
from streams.sinks import Sinks
from streams.store import SCHEME as STORE_SCHEME
from streams.store import WriteBehind, flush_before_commit
from streams.transport import TunedApp, read_true_ends
from streams.user_state import STEP as USER_STATE_STEP
from streams.user_state import LocalUpdates, Tables, UserStateStep, update_user_state
from streams.web import register_health, register_reads

log = structlog.get_logger(__name__)

Role = Literal["all", "ingest", "encoder", "recommend"]
ROLES: tuple[Role, ...] = ("all", "ingest", "encoder", "recommend")


@dataclass
class Topology:
    """The built app and what it holds, for the worker, the CLI and tests."""

    app: faust.App
    role: Role
    services: Services
    agents: dict[str, Any] = field(default_factory=dict)
    tables: Tables | None = None
    heap: HeapKeeper | None = None  # None: CPython's collector as it is (stream.gc_freeze_s 0)


def advertised_url(settings: Settings) -> str:
    """The URL other workers forward REST requests to: ``stream.advertised_url``, or built from
    the web host and port. For an every-interface host it names this machine's address as its
    host name resolves (in a container or a pod, the address the others reach it at)."""
    stream = settings.stream
    if stream.advertised_url:
        return stream.advertised_url
    host = stream.web_host
    if host in ("0.0.0.0", "::", ""):
        name = socket.gethostname()
        try:
            host = socket.gethostbyname(name)
        except OSError:
            host = name
    return f"http://{host}:{stream.web_port or 6066}"


def create_app(settings: Settings, role: Role) -> TunedApp:
    """The Faust app: raw bytes on every topic (we validate ourselves), tables in RocksDB (or in
    memory, ``stream.table_store``)."""
    stream = settings.stream
    datadir = settings.data_dir / "faust" / role
    datadir.parent.mkdir(parents=True, exist_ok=True)
    return TunedApp(
        f"{stream.app_id}-{role}" if role != "all" else stream.app_id,
        fetch_max_wait_ms=settings.kafka.fetch_max_wait_ms,
        end_probe=partial(read_true_ends, settings.kafka),
        direct_hand_over=stream.direct_hand_over,
        **faust_broker_options(settings.kafka),
        store=f"{STORE_SCHEME}://" if stream.table_store == "rocksdb" else "memory://",
        autodiscover=False,
        topic_partitions=settings.kafka.partitions,
        topic_replication_factor=settings.kafka.replication_factor,
        key_serializer="raw",
        value_serializer="raw",
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.kafka.session_timeout_ms / 1000,
        stream_wait_empty=False,
        stream_buffer_maxsize=stream.buffer_maxsize,
        web_enabled=stream.web_port > 0,
        web_port=stream.web_port or 6066,
        web_bind=stream.web_host,
        canonical_url=advertised_url(settings),
        datadir=str(datadir),
    )


def user_tables(app: TunedApp) -> Tables:
    """The user-state step's tables on ``app``, each held until a commit writes it."""
    table_schema: faust.Schema = faust.Schema(
        key_type=str, key_serializer="raw", value_serializer="json"
    )

    def table(name: str, encode: Callable[[Any], Any] | None = None) -> WriteBehind:
        return WriteBehind(
            app.Table(name, default=None, schema=table_schema, use_partitioner=True),
            app.changelog_batches,
            encode,
        )

    users = table("user-state", UserState.to_dict)  # holds UserState objects until a commit
    covisit, popularity = table("covisit"), table("popularity")
    # counts before user states, as in each batch (see UserStateStep.absorb)
    flush_before_commit(app, [covisit, popularity, users])

    @app.on_partitions_revoked.connect
    def drop_revoked_writes(sender: Any, /, *args: Any, signal: Any, **__: Any) -> None:
        """Held writes to partitions this worker gives up are not its to write (see
        :meth:`WriteBehind.drop`); the tables' changelogs are partitioned as the user updates."""
        gone = {tp.partition for tp in args[0] if tp.topic == USER_UPDATES.name}
        dropped = {t.table.name: t.drop(gone) for t in (users, covisit, popularity)}
        if any(dropped.values()):
            log.info("held_writes_dropped", partitions=sorted(gone), **dropped)

    return Tables(users=users, covisit=covisit, popularity=popularity)


def outdated(app: faust.App, message: Any) -> bool:
    """Whether ``app``'s consumer fetched ``message`` before its partition's latest seek."""
    return bool(cast(Any, app.consumer).outdated(message))


def lagging(app: faust.App) -> bool:
    """Whether ``app``'s consumer has input records past those it has handed out."""
    return bool(cast(Any, app.consumer).lagging())


def keep_heap(app: faust.App, freeze_s: float, full_s: float) -> HeapKeeper:
    """A heap keeper whose :meth:`~HeapKeeper.tick` runs on ``app``'s loop every ``freeze_s``."""
    keeper = HeapKeeper(freeze_s=freeze_s, full_s=full_s)

    @app.timer(freeze_s, name="keep-heap")
    async def keep() -> None:
        keeper.tick()

    return keeper


def local_updates(app: faust.App, step: UserStateStep) -> LocalUpdates:
    """The ingest agent's path straight to ``step``, told of each rebalance of ``app``."""
    local = LocalUpdates(step, USER_UPDATES.name)

    @app.on_partitions_revoked.connect
    def stop_local_updates(sender: Any, /, *_: Any, signal: Any, **__: Any) -> None:
        local.revoked()

    @app.on_partitions_assigned.connect
    def start_local_updates(sender: Any, /, *args: Any, signal: Any, **__: Any) -> None:
        local.assigned(args[0])  # the whole new assignment

    return local


def build_topology(settings: Settings, role: Role, services: Services) -> Topology:
    """Declare topics, tables and the agents of ``role`` on a new app."""
    app = create_app(settings, role)
    topics = {s.name: app.topic(s.name, internal=False) for s in ALL_TOPICS}
    sinks = Sinks(topics)
    topo = Topology(app, role, services)
    batch, wait_s = settings.stream.batch_size, settings.stream.batch_wait_ms / 1000
    web = settings.stream.web_port > 0

    # role "all": the ingest agent applies the updates of the users whose partition it holds
    local: LocalUpdates | None = None

    if role in ("all", "ingest"):
        inputs = app.topic(*(s.name for s in INPUT_TOPICS))

        async def validate_input(stream: Any) -> None:
            await ingest(
                stream,
                sinks=sinks,
                batch_size=batch,
                batch_wait_s=wait_s,
                scrub=settings.privacy.scrub_pii,
                partitions=settings.kafka.partitions,
                local=local,
                outdated=partial(outdated, app),
            )

        topo.agents[INGEST_STEP] = app.agent(inputs, name=INGEST_STEP)(validate_input)

    if role in ("all", "encoder"):
        enc = settings.encoder
        step = EncodeStep.for_services(
            services, sinks, ThreadPoolExecutor(1, thread_name_prefix="encoder")
        )

        async def encode_agent(stream: Any) -> None:
            await encode_text(
                stream,
                step=step,
                batch_size=step.encoder.batch_size,
                batch_wait_s=enc.max_wait_ms / 1000,
            )

        topo.agents[EncodeStep.STEP] = app.agent(
            topics[ENCODE_REQUESTS.name], name=EncodeStep.STEP
        )(encode_agent)

    if role in ("all", "recommend"):
        tables = user_tables(app)
        user_step = UserStateStep(
            tables=tables,
            recommender=services.recommender(),
            store=services.store(),
            reviews_collection=settings.vectors.reviews_collection,
            sinks=sinks,
            model_version=services.model_version,
            max_recent=settings.ranking.recent_items,
            partitions=settings.kafka.partitions,
            latest_lists=settings.serving.latest_lists,
        )

        @app.on_partitions_assigned.connect
        def drop_cached_items(sender: Any, /, *_: Any, signal: Any, **__: Any) -> None:
            """Notices of changed items reach a worker through the partitions it holds; after a
            rebalance it may have missed some, so its item table starts again from the store."""
            store = services.store()
            if isinstance(store, CachedStore):
                store.clear()

        ranking = ThreadPoolExecutor(1, thread_name_prefix="recommend")
        if role == "all" and settings.stream.direct_updates:
            local = local_updates(app, user_step)

        async def user_state_agent(stream: Any) -> None:
            await update_user_state(
                stream,
                step=user_step,
                batch_size=batch,
                batch_wait_s=wait_s,
                executor=ranking,
                round_size=settings.stream.rank_round,
                backlog_limit=settings.stream.rank_backlog,
                max_delay_s=settings.stream.rank_max_delay_ms / 1000,
                local=local,
                outdated=partial(outdated, app),
                lagging=partial(lagging, app),
            )

        topo.agents[USER_STATE_STEP] = app.agent(topics[USER_UPDATES.name], name=USER_STATE_STEP)(
            user_state_agent
        )
        topo.tables = tables
        serving(services.recommender().version, services.model_version())
        if web:
            register_reads(
                app,
                step=user_step,
                store=services.store(),
                items_collection=settings.vectors.items_collection,
                executor=ranking,
            )
        if settings.serving.model_dir is not None and settings.serving.watch_s > 0:

            @app.timer(settings.serving.watch_s, name="watch-model")
            async def watch_model() -> None:
                """Switch to a newly trained model without a restart (loaded off the loop)."""
                model = await asyncio.get_running_loop().run_in_executor(
                    None, services.changed_model
                )
                if model is not None:
                    services.recommender().model = model
                    serving(model.version, services.model_version())
                    log.info("model_switched", version=model.version)

    if web:
        register_health(app, user_routes=role in ("all", "recommend"))
    watch_consumer(app)

    if settings.stream.gc_freeze_s > 0:
        topo.heap = keep_heap(app, settings.stream.gc_freeze_s, settings.stream.gc_full_s)
    return topo
