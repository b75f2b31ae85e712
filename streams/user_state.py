"""User state: consumes user updates; writes the user, co-visitation and popularity tables and emits
one fresh recommendation per user for everything since their last list (a burst of events yields
one list, not ten).

Per batch: updates are grouped by user, each user's state is written once, co-visitation counts once
per touched item. The users then wait in a :class:`Backlog`, ranked a round at a time with one round
of batched vector-store calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, MutableMapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import structlog

from infra.vectors import VectorStore
from infra.vectors.cached import CachedStore
from models.covisit import add_counts, bump_popularity, covisit_pairs
from models.profiles import refresh_profiles
from models.ranking import Ranked
from models.recommender import Recommender, UserRequest, covisit_sources
from models.state import UserState, apply_interaction, apply_review
from schemas.events import RecommendationEvent, RecommendedItem, now_ms
from schemas.internal import EncodeRequest, UserUpdate
from schemas.serde import encode
from schemas.topics import ENCODE_REQUESTS, RECOMMENDATIONS
from streams.observe import count_events, count_messages, recommended
from streams.sinks import Output, Sinks, barriers, items_changed
from streams.store import WriteBehind
from streams.transport import fresh

STEP = "update-user-state"
POPULAR_KEY = "__all__"
FORGET_REVIEWS = 100_000  # a user's reviews read back on forget, to rebuild the items' profiles
BEHIND_S = 0.25  # a worker whose newest input event arrived longer ago than this is behind
IDLE_S = 0.1  # an agent that has taken no batch for this long has caught up
DRAIN_S = 10.0  # how long a stopping worker may spend ranking the users still waiting for a list
log = structlog.get_logger(__name__)


@dataclass(slots=True)
class Tables:
    """The tables this step owns (Faust tables in the worker, dicts in unit tests).

    ``users`` takes table records (:meth:`UserState.to_dict`), unless it encodes what it holds
    on its way to the changelog (the worker's :class:`streams.store.WriteBehind` with an
    ``encode``): then it takes the :class:`UserState` objects themselves, so an active user's
    state is decoded once per commit, not once per batch. Either way it may give back records
    (read from the store)."""

    users: MutableMapping[str, Any]
    covisit: MutableMapping[str, Any]
    popularity: MutableMapping[str, Any]

    def state(self, user_id: str) -> UserState:
        """The user's state, theirs to change (a held object is copied, never shared)."""
        held = self.users.get(user_id)
        return held.copy() if isinstance(held, UserState) else UserState.from_dict(held)

    def put_state(self, user_id: str, state: UserState) -> None:
        users = self.users
        encodes = isinstance(users, WriteBehind) and users.encode is not None
        users[user_id] = state if encodes else state.to_dict()


@dataclass(slots=True)
class Applied:
    """What one user's updates in a batch did."""

    state: UserState
    pairs: list[tuple[str, str]] = field(default_factory=list)  # co-visitation pairs
    touched: list[str] = field(default_factory=list)  # items interacted with
    changed: bool = False  # False when every update was a repeat: nothing to write or rank
    repeats: int = 0  # behaviour events already applied before (redelivered or replayed)


def apply_updates(state: UserState, updates: list[UserUpdate], max_recent: int) -> Applied:
    """Apply one user's updates in order, skipping behaviour events the state has already seen
    (at-least-once redelivery, a replayed log), so nothing is counted twice."""
    out = Applied(state)
    for up in updates:
        if up.kind == "forget":
            out = Applied(UserState(), changed=True, repeats=out.repeats)
        elif up.kind == "review_embedded" and up.review_point and up.item_id:
            if apply_review(out.state, up.review_point, up.item_id, up.review_snippet or ""):
                out.changed = True
        elif up.kind == "behavior" and up.item_id:
            if (up.event_id, up.ts) in out.state.seen:
                out.repeats += 1
                continue
            before = apply_interaction(
                out.state, up.item_id, up.event_type, up.ts, up.value, max_recent=max_recent
            )
            out.state.seen.add(up.event_id, out.state.last_ts)
            out.pairs.extend(covisit_pairs(before, up.item_id))
            out.touched.append(up.item_id)
            out.state.last_event_id = up.event_id
            out.changed = True
    return out


def recommendation_event(
    user_id: str,
    trigger: UserUpdate,
    ranked: list[Ranked],
    model_version: str,
    reflects: str = "",
) -> RecommendationEvent:
    """The public recommendation record for one user's fresh list.

    ``trigger_event_id`` is ``reflects``, the newest behaviour event in the user's state, when
    there is one: a list refreshed because a review's vector arrived after the user's next
    events reflects those events too, so naming the review would date it too early (and a reader
    judging "the list shown after event X" would take a list that already knows X's successor).
    Latency still runs from the update that started this list.
    """
    return RecommendationEvent(
        user_id=user_id,
        trigger_event_id=reflects or trigger.event_id,
        model_version=model_version,
        latency_ms=max(0.0, float(now_ms() - trigger.received_ms)),
        items=[
            RecommendedItem(item_id=r.item_id, rank=n, score=r.score, reasons=r.reasons)
            for n, r in enumerate(ranked, start=1)
        ],
    )


class UserStateStep:
    """The user-state agent's work for one batch, kept apart from Faust so tests can drive it."""

    def __init__(
        self,
        *,
        tables: Tables,
        recommender: Recommender,
        store: VectorStore,
        reviews_collection: str,
        sinks: Sinks,
        model_version: str | Callable[[], str],
        max_recent: int,
        partitions: int = 0,
        latest_lists: int = 0,
    ) -> None:
        """``partitions``: how many partitions the user-updates topic has, for the notices that
        name items whose profiles a forget rebuilt (0 sends none). ``latest_lists``: how many
        users' latest lists to keep for :meth:`latest` (the least recently updated go first)."""
        self.tables = tables
        self.recommender = recommender
        self.store = store
        self.reviews = reviews_collection
        self.sinks = sinks
        self.model_version = model_version
        self.max_recent = max_recent
        self.partitions = partitions
        self.repeats = 0  # behaviour events skipped as already applied, since start
        self.latest_lists = latest_lists
        self._latest: OrderedDict[str, bytes] = OrderedDict()

    def latest(self, user_id: str) -> bytes | None:
        """The encoded latest list sent for ``user_id`` by this worker, if it still keeps it."""
        return self._latest.get(user_id)

    def _keep(self, user_id: str, encoded: bytes) -> None:
        if self.latest_lists <= 0:
            return
        kept = self._latest
        kept[user_id] = encoded
        kept.move_to_end(user_id)
        while len(kept) > self.latest_lists:
            kept.popitem(last=False)

    def fresh_list(self, user_id: str) -> RecommendationEvent | None:
        """A list ranked now from the user's state in the tables (None for an unknown user, or
        when nothing is recommendable); it names the newest event in the state as its trigger.
        It only reads the tables, so the ranking thread may run it."""
        state = self.tables.state(user_id)
        if not state.events and not state.reviews:
            return None
        request = UserRequest(user_id, state, self._neighbours_of(state))
        ranked = self.recommender.recommend(
            [request], self.tables.popularity.get(POPULAR_KEY) or {}
        )[0]
        if not ranked:
            return None
        version = self.model_version() if callable(self.model_version) else self.model_version
        return RecommendationEvent(
            user_id=user_id,
            trigger_event_id=state.last_event_id or user_id,
            model_version=version,
            latency_ms=0.0,
            items=[
                RecommendedItem(item_id=r.item_id, rank=n, score=r.score, reasons=r.reasons)
                for n, r in enumerate(ranked, start=1)
            ],
        )

    def run(self, updates: list[UserUpdate]) -> list[RecommendationEvent]:
        """Update every user in the batch once and emit their fresh lists."""
        requests, popular = self.absorb(updates)
        self.neighbours(requests)
        return self.emit(requests, self.recommender.recommend([r for r, _ in requests], popular))

    def absorb(
        self, updates: list[UserUpdate]
    ) -> tuple[list[tuple[UserRequest, UserUpdate]], dict[str, float]]:
        """Apply the batch to the tables (each user, co-visited item and the popularity written
        once); return who needs a fresh list, with the update that asked, and the popularity.

        A behaviour event the user's state has already seen (a redelivery after a crash, a log
        replayed twice) is skipped, so neither the state nor the counts take it twice."""
        by_user: dict[str, list[UserUpdate]] = defaultdict(list)
        for up in updates:
            if up.kind == "items_changed":
                if isinstance(self.store, CachedStore):
                    self.store.invalidate(up.item_ids or ())
                continue
            by_user[up.user_id].append(up)
        neighbour_counts: dict[str, list[str]] = defaultdict(list)
        touched_all: list[str] = []
        requests: list[tuple[UserRequest, UserUpdate]] = []
        for user_id, ups in by_user.items():
            forget = next((u for u in ups if u.kind == "forget"), None)
            if forget is not None:
                self._forget(forget)
            applied = apply_updates(self.tables.state(user_id), ups, self.max_recent)
            if applied.repeats:
                self.repeats += applied.repeats
                log.info("repeats_skipped", step=STEP, user_id=user_id, repeats=applied.repeats)
            if not applied.changed:
                continue  # every update was a repeat: the state and its list are current
            for a, b in applied.pairs:
                neighbour_counts[a].append(b)
            touched_all.extend(applied.touched)
            state = applied.state
            if not state.events and not state.reviews:
                continue  # forgotten (or nothing to remember): no state, no recommendation
            requests.append((UserRequest(user_id, state, {}), ups[-1]))
        # The counts first, the user states last: a crash between the two changelog writes then
        # leaves user states that have not seen the batch, so its redelivery is applied again
        # (the counts of that batch may count twice); the other order would drop them for good.
        for item, others in neighbour_counts.items():
            self.tables.covisit[item] = add_counts(self.tables.covisit.get(item), others)
        popular = self.tables.popularity.get(POPULAR_KEY) or {}
        if touched_all:
            popular = bump_popularity(popular, touched_all)
            self.tables.popularity[POPULAR_KEY] = popular
        for req, _ in requests:
            self.tables.put_state(req.user_id, req.state)
        return requests, popular

    def _forget(self, update: UserUpdate) -> None:
        """Drop the user's state and reviews, and rebuild the review profiles their reviews were
        part of; an item left with no review is sent back to the encoder for its own text."""
        user_id = update.user_id
        self.tables.users.pop(user_id, None)
        self._latest.pop(user_id, None)
        mine = self.store.points_where(self.reviews, "user_id", user_id, limit=FORGET_REVIEWS)
        self.store.delete_where(self.reviews, "user_id", user_id)
        items = self.recommender.items
        reviewed = [str(p.payload.get("item_id")) for p in mine]
        for point in refresh_profiles(self.store, items, self.reviews, reviewed):
            key = point.key
            request = EncodeRequest(
                event_id=update.event_id,
                ts=update.ts,
                received_ms=update.received_ms,
                kind="item",
                item_id=key,
                text=key,
                title=str(point.payload.get("title") or key),
                categories=list(point.payload.get("categories") or []),
                available=bool(point.payload.get("available", True)),
            )
            self.sinks.send(Output(ENCODE_REQUESTS, key, request.model_dump_json().encode()))
        # after the profiles are rewritten: a worker that drops them now reads the new ones
        self.sinks.send_all(items_changed(reviewed, partitions=self.partitions, origin=update))
        log.info(
            "user_forgotten",
            step=STEP,
            user_id=user_id,
            event_id=update.event_id,
            profiles=len(set(reviewed)),
        )

    def neighbours(self, requests: list[tuple[UserRequest, UserUpdate]]) -> None:
        for req, _ in requests:
            req.neighbours = self._neighbours_of(req.state)

    def _neighbours_of(self, state: UserState) -> dict[str, Any]:
        covisit = self.tables.covisit
        return {src: n for src in covisit_sources(state) if (n := covisit.get(src))}

    def emit(
        self, requests: list[tuple[UserRequest, UserUpdate]], lists: list[list[Ranked]]
    ) -> list[RecommendationEvent]:
        version = self.model_version() if callable(self.model_version) else self.model_version
        events = []
        for (req, trigger), ranked in zip(requests, lists, strict=True):
            if not ranked:  # nothing recommendable yet (e.g. the catalogue is still embedding)
                log.info(
                    "nothing_to_recommend",
                    step=STEP,
                    user_id=req.user_id,
                    event_id=trigger.event_id,
                )
                continue
            event = recommendation_event(
                req.user_id, trigger, ranked, version, req.state.last_event_id
            )
            encoded = encode(event)
            self.sinks.send(Output(RECOMMENDATIONS, req.user_id, encoded))
            self._keep(req.user_id, encoded)
            recommended(event.latency_ms / 1000)
            events.append(event)
        return events


@dataclass(slots=True)
class Due:
    """A user waiting for a fresh list."""

    request: UserRequest  # the newest state
    trigger: UserUpdate  # the oldest update no list has answered yet: latency runs from it
    message: Any  # that update's message, for the dead letter if ranking this user fails
    since: float  # when the wait started (monotonic seconds)


class Backlog:
    """Users whose state changed and who wait for a fresh list, ranked at the ranking's own pace.

    The agent writes each batch to the tables and leaves its users here; a task takes up to
    ``round_size`` of them at a time, oldest first, ranks them on ``executor`` and emits their
    lists, while the event loop goes on absorbing batches. While ranking keeps up, a user's list
    follows their batch at once. When events come faster than lists can be ranked, a waiting
    user's further events join the entry already waiting, so one list answers all of them (a
    burst of clicks yields one fresh list, not ten stale ones) and ingestion is not held back by
    ranking until ``limit`` users wait (then :meth:`room` holds the agent, so memory is bounded).

    Ingestion comes first: while the agent is behind on its input (see :meth:`pace`), ranking
    waits until the oldest waiting user has waited ``max_delay_s``, so each list answers more
    events and the worker spends its time absorbing them; once the agent has caught up, everyone
    waiting is ranked at once.

    A list is derived from the state in the tables: a worker killed before it ranked a waiting
    user has that user's events in the state (the offsets were committed after the tables were
    written), and the user's next event, or a read of their list, ranks it again.
    """

    def __init__(
        self,
        step: UserStateStep,
        executor: Executor,
        *,
        round_size: int,
        limit: int,
        max_delay_s: float = 0.0,
        lagging: Callable[[], bool] | None = None,
    ) -> None:
        self.step = step
        self.executor = executor
        self.round_size = round_size
        self.limit = limit
        self.max_delay_s = max_delay_s
        self.lagging = lagging  # whether the input has records not yet taken (see _defer_s)
        self._paced_at = 0.0
        self._caught_up = asyncio.Event()  # clear while the agent is behind on its input
        self._caught_up.set()
        self.waiting: dict[str, Due] = {}
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._closing = False
        self._task: asyncio.Future[None] | None = None

    def add(self, requests: list[tuple[UserRequest, UserUpdate]], messages: dict[int, Any]) -> None:
        """Leave each user's newest state waiting; a user already waiting keeps the trigger
        their wait started with. ``messages``: each update's message, by ``id()`` of the update."""
        for req, trigger in requests:
            due = self.waiting.get(req.user_id)
            if due is None:
                self.waiting[req.user_id] = Due(
                    req, trigger, messages.get(id(trigger)), time.monotonic()
                )
            else:
                due.request = req
        if self.waiting:
            self._ready.set()
        if len(self.waiting) >= self.limit:
            self._room.clear()

    async def room(self) -> None:
        """Return once fewer than ``limit`` users wait. If the ranking task has ended with an
        infrastructure failure, raise it: the agent fails with it, as when it ranked inline."""
        self._check()
        while len(self.waiting) >= self.limit:
            room: asyncio.Future[Any] = asyncio.ensure_future(self._room.wait())
            assert self._task is not None
            await asyncio.wait([room, self._task], return_when=asyncio.FIRST_COMPLETED)
            room.cancel()
            self._check()

    def _check(self) -> None:
        task = self._task
        if task is None:
            raise RuntimeError("the backlog's ranking task is not running")
        if task.done():
            task.result()  # its failure
            raise RuntimeError("the backlog's ranking task ended")

    def pace(self, age_s: float) -> None:
        """Tell the backlog how old the newest update in the agent's last batch was (since the
        broker received the input event it came from): older than :data:`BEHIND_S` means the
        worker is behind on its input, whichever hop holds it back."""
        self._paced_at = time.monotonic()
        if age_s > BEHIND_S:
            self._caught_up.clear()
        else:
            self._caught_up.set()

    def start(self) -> None:
        """Start ranking in a task of the running event loop."""
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            await self._ready.wait()
            if not self.waiting:
                return  # closing, and nobody left to rank
            wait_s = self._defer_s()
            if wait_s > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._caught_up.wait(), min(wait_s, IDLE_S))
                continue
            await self.rank_round()

    def _defer_s(self) -> float:
        """How much longer ranking waits for ingestion (0: rank now)."""
        now = time.monotonic()
        if (
            self._caught_up.is_set()
            or (now - self._paced_at > IDLE_S and not self._input_left())  # caught up
            or self._closing
            or len(self.waiting) >= self.limit
        ):
            return 0.0
        oldest = next(iter(self.waiting.values()))
        return max(0.0, oldest.since + self.max_delay_s - now)

    def _input_left(self) -> bool:
        """Whether the input still has records the agent has not taken. An agent that has
        taken no batch for :data:`IDLE_S` has caught up, unless records are left (a fetch
        answered slowly, say): taken for caught up, such a pause had the backlog rank everyone
        waiting, a thousand lists at a time under ``e2e.py --max`` (docs/performance.md)."""
        return self.lagging is not None and self.lagging()

    async def close(self, timeout_s: float) -> None:
        """Rank everyone still waiting (a clean stop), within ``timeout_s``; then stop."""
        task, self._task = self._task, None
        if task is None:
            return
        self._closing = True
        self._ready.set()
        self._caught_up.set()
        waiting = len(self.waiting)
        deadline = time.monotonic() + timeout_s
        cancelled = False
        while not task.done():
            # A stopping Faust agent is also cancelled: finish the drain first (within the
            # deadline), then let the cancellation through.
            try:
                await asyncio.wait_for(asyncio.shield(task), max(0.0, deadline - time.monotonic()))
            except asyncio.CancelledError:
                cancelled = True
            except TimeoutError:
                break
        if not task.done():
            task.cancel()
            log.warning("backlog_not_drained", step=STEP, waiting=len(self.waiting))
        elif waiting:
            log.info("backlog_drained", step=STEP, ranked=waiting)
        if cancelled:
            raise asyncio.CancelledError

    async def rank_round(self) -> int:
        """Rank up to ``round_size`` waiting users (oldest first) and emit their lists."""
        dues = [self.waiting.pop(u) for u in list(islice(self.waiting, self.round_size))]
        if not self.waiting and not self._closing:
            self._ready.clear()
        if len(self.waiting) < self.limit:
            self._room.set()
        if dues:
            await self._rank(dues)
        return len(dues)

    async def _rank(self, dues: list[Due]) -> None:
        step = self.step
        requests = [(d.request, d.trigger) for d in dues]
        step.neighbours(requests)
        popular = step.tables.popularity.get(POPULAR_KEY) or {}
        loop = asyncio.get_running_loop()
        try:
            lists = await loop.run_in_executor(
                self.executor, step.recommender.recommend, [r for r, _ in requests], popular
            )
        except DATA_ERRORS as exc:
            if len(dues) == 1:
                if dues[0].message is not None:
                    step.sinks.dead(stage=STEP, message=dues[0].message, exc=exc)
                return
            log.warning("round_failed", step=STEP, size=len(dues), error=type(exc).__name__)
            for due in dues:
                await self._rank([due])
            return
        step.emit(requests, lists)


async def update_user_state(
    stream: Any,
    *,
    step: UserStateStep,
    batch_size: int,
    batch_wait_s: float,
    executor: Executor | None = None,
    round_size: int = 256,
    backlog_limit: int = 20_000,
    max_delay_s: float = 0.0,
    local: LocalUpdates | None = None,
    outdated: Callable[[Any], bool] | None = None,
    lagging: Callable[[], bool] | None = None,
) -> None:
    """Batch user updates and hand each batch to :class:`UserStateStep`: with an ``executor``,
    the batch goes into the tables at once and its users wait in a :class:`Backlog` ranked on the
    executor; without one, each batch is ranked inline before the next is taken.

    ``local``: the ingest agent's updates applied in this worker, which share the backlog (an
    ``executor`` is needed) and learn from this agent when their barriers have arrived.
    ``outdated``: messages that are no longer this worker's to take (a rebalance came between
    their fetch and now) are left (:func:`streams.transport.fresh`). ``lagging``: whether the
    input has records not yet taken (:meth:`Backlog._input_left`)."""
    backlog = None
    if executor is not None:
        backlog = Backlog(
            step,
            executor,
            round_size=round_size,
            limit=backlog_limit,
            max_delay_s=max_delay_s,
            lagging=lagging,
        )
        backlog.start()
        if local is not None:
            local.backlog = backlog
    try:
        async for taken in stream.take_events(batch_size, within=batch_wait_s):
            count_events(STEP, taken, per_line=True)
            events = fresh(taken, outdated, STEP)
            parsed = step.sinks.parse(events, UserUpdate, stage=STEP, lines=True)
            parsed, arrived = _split_barriers(parsed)
            # A message may carry many updates: at most ``batch_size`` of them at a time, so
            # the loop (fetching, commits, the ranking task) runs between. The batch's offsets
            # are acknowledged only after the last of them.
            for start in range(0, len(parsed), batch_size):
                if start:
                    await asyncio.sleep(0)
                batch = parsed[start : start + batch_size]
                if backlog is None:
                    run_or_isolate(step, batch)
                else:
                    await take_in(step, batch, backlog, events[-1].message)
            if local is not None:
                for token, partition in arrived:  # once what was sent before them is applied
                    local.arrived(token, partition)
    finally:
        if local is not None:
            local.backlog = None
        if backlog is not None:
            await backlog.close(DRAIN_S)


async def take_in(
    step: UserStateStep, batch: list[tuple[UserUpdate, Any]], backlog: Backlog, last: Any
) -> None:
    """Write ``batch`` to the tables and leave its users in ``backlog``
    (:func:`absorb_or_isolate`), tell the backlog how far behind its input is (``last``: the
    batch's newest message), and wait while the backlog is full."""
    absorb_or_isolate(step, batch, backlog)
    backlog.pace(input_age_s(batch, last))
    await backlog.room()


def input_age_s(batch: list[tuple[UserUpdate, Any]], last: Any) -> float:
    """How long ago the broker received the newest behaviour event in ``batch`` (the input
    topic's, before the ingest hop); for a batch without one (embedded reviews, notices, which
    come through the encoder), how long ago ``last``, the batch's newest message, was written."""
    newest = max((u.received_ms for u, _ in batch if u.kind == "behavior"), default=None)
    written_s = last.timestamp if newest is None else newest / 1000
    return time.time() - written_s


def _split_barriers(
    parsed: list[tuple[UserUpdate, Any]],
) -> tuple[list[tuple[UserUpdate, Any]], list[tuple[str, int]]]:
    """``parsed`` without its barriers (a barrier changes no user), and each barrier's token and
    partition."""
    if not any(update.kind == "barrier" for update, _ in parsed):
        return parsed, []
    rest, found = [], []
    for update, origin in parsed:
        if update.kind == "barrier":
            found.append((update.event_id, origin.partition))
        else:
            rest.append((update, origin))
    return rest, found


class LocalUpdates:
    """The user updates a worker of role ``all`` applies itself: one broker hop instead of two.

    The ingest agent sends a user's updates through the user-updates topic to whichever worker
    holds the user's partition of it. When that is this worker, the ingest agent hands them to
    its own user-state step instead (:meth:`apply`): the same absorb, backlog and ranking as
    the user-state agent, with the input message as the update's message (a dead letter
    carries the original event's bytes).

    **Order.** A user's updates must be applied in the order of their events. Updates sent
    through the topic before this worker held the partition (by the worker that held the input
    partition before a rebalance, or by this one before it was ready) could otherwise be
    applied after later events applied here. So on every assignment a ``barrier`` naming it goes
    to each held partition of the user-updates topic, and the ingest agent waits (:meth:`ready`)
    until the user-state agent has read this assignment's barrier back on every one: everything
    sent to them before has been applied by then. A rebalance revokes first, and the workers
    giving up partitions flush what they sent before the new assignment. Both agents leave the
    events fetched before a rebalance's seek (:func:`streams.transport.fresh`): every partition
    is read again from its committed offset once the assignment's tables are recovered.

    **Commits.** The input offsets of updates applied here are committed as the user-state
    agent's are: after the table writes they made have reached the changelog (the commit flushes
    the tables first; see :func:`streams.store.flush_before_commit`).
    """

    def __init__(self, step: UserStateStep, topic: str) -> None:
        self.step = step
        self.topic = topic  # the user-updates topic's name
        self.backlog: Backlog | None = None  # set while the user-state agent runs
        self.held: frozenset[int] = frozenset()
        self._token = ""
        self._awaited: set[int] = set()
        self._ready = asyncio.Event()

    def assigned(self, assigned: Iterable[Any]) -> None:
        """A new assignment (every topic partition this worker now holds): send the barriers of
        its user-updates partitions; until they are all read back, :meth:`ready` waits."""
        held = frozenset(tp.partition for tp in assigned if tp.topic == self.topic)
        self.held = held
        self._token = f"barrier-{uuid.uuid4().hex}"
        self._awaited = set(held)
        if not held:
            self._ready.set()
            return
        self._ready.clear()
        self.step.sinks.send_all(barriers(self._token, held, now_ms()))

    def revoked(self) -> None:
        """A rebalance has begun: apply nothing here until the next assignment is ready."""
        self.held = frozenset()
        self._ready.clear()

    def arrived(self, token: str, partition: int) -> None:
        """The user-state agent read a barrier on ``partition``."""
        if token != self._token or partition not in self._awaited:
            return  # an earlier assignment's, or a repeat
        self._awaited.discard(partition)
        if not self._awaited:
            self._ready.set()
            log.info("local_updates_ready", step=STEP, partitions=sorted(self.held))

    async def ready(self) -> None:
        """Return once the current assignment's barriers have all been read back."""
        if not self._ready.is_set():
            await self._ready.wait()

    def owns(self, partition: int) -> bool:
        """Whether an update for ``partition`` of the user-updates topic is applied here."""
        return self.backlog is not None and self._ready.is_set() and partition in self.held

    async def apply(self, batch: list[tuple[UserUpdate, Any]]) -> None:
        """Write the updates (each with its input message) to the tables and leave their users
        waiting for a list, as the user-state agent does with a batch it reads."""
        backlog = self.backlog
        if backlog is None:
            raise RuntimeError("local updates need the user-state agent's backlog")
        count_messages(STEP, (message for _, message in batch))
        await take_in(self.step, batch, backlog, batch[-1][1])


#: Errors that mean "this update cannot be processed", as opposed to infrastructure failures
#: (broker, vector store), which propagate so the worker backs off instead of skipping input.
DATA_ERRORS = (ValueError, TypeError, KeyError, IndexError)


def absorb_or_isolate(
    step: UserStateStep, batch: list[tuple[UserUpdate, Any]], backlog: Backlog
) -> None:
    """Write the batch to the tables and leave its users in ``backlog``, isolating failures as
    :func:`run_or_isolate` does."""
    messages = {id(update): message for update, message in batch}

    def absorb(updates: list[UserUpdate]) -> None:
        backlog.add(step.absorb(updates)[0], messages)

    run_or_isolate(step, batch, absorb)


def run_or_isolate(
    step: UserStateStep,
    batch: list[tuple[UserUpdate, Any]],
    apply: Callable[[list[UserUpdate]], Any] | None = None,
) -> None:
    """Apply the batch with ``apply`` (default :meth:`UserStateStep.run`: tables and lists
    inline); on a data error, apply its updates one by one and dead-letter the failures (a
    retried update the state has already seen is skipped)."""
    apply = apply or step.run
    try:
        apply([up for up, _ in batch])
        return
    except DATA_ERRORS as exc:
        log.warning("batch_failed", step=STEP, size=len(batch), error=type(exc).__name__)
    for update, message in batch:
        try:
            apply([update])
        except DATA_ERRORS as exc:
            step.sinks.dead(stage=STEP, message=message, exc=exc)
