"""recstream's Faust app: a tunable fetch wait, a flush that drains, and true changelog ends.

Three changes to Faust's aiokafka driver, each for a measured or tested reason:

- **Fetch wait.** The driver fixes the consumer's fetch wait at 1,500 ms. Apache Kafka answers a
  waiting fetch as soon as data arrives, so the value rarely matters there; the embedded broker
  holds an empty fetch for the whole wait, which added up to 1.5 s per hop. Measured on the
  embedded broker (2-core machine): one message's consume latency was 382 ms with a 1,500 ms
  wait, 12 ms with 100 ms and 2-5 ms with 10 ms.
- **Flush before commit.** Faust flushes its producer buffer (table changelog writes and
  ``send_soon`` outputs) before it commits consumer offsets, but its flush returns after any
  0.1 s in which no message left the buffer, full or not. Under load an offset could then be
  committed before the state write it depends on was sent, and a ``kill -9`` at that moment lost
  the write (found by ``tests/test_reliability.py``). :class:`DrainingBuffer` waits until the
  buffer is empty, for at most :data:`FLUSH_DEADLINE_S`.
- **Changelog ends.** A restarting worker rebuilds its tables by reading each changelog partition
  up to its high watermark. The embedded broker reports the high watermark as one past the
  *first* offset of the partition's last record batch, not past its last record, so recovery
  stopped short and missed the newest state of some keys. When an ``end_probe`` is given, the
  reported ends are checked by reading from one before each of them, and raised to one past the
  last record found. Against Apache Kafka the probe reads one record per partition and changes
  nothing.
- **Offsets that are committed.** Four holes let a worker commit past an input message it never
  processed, so that a restart lost it (found by ``tests/test_reliability.py``: one event in 901
  lost in 5 of 8 ``kill -9`` runs):

  1. A seek to the committed offsets (after a rebalance, and when recovery completes) can land
     while the fetcher is still handing out a batch fetched before it. The fetcher went on
     with that old batch, set its read position past the seek, and dropped the re-fetched
     messages as already read; messages that were queued and then cleared at the same moment
     were never seen again. Every seek is now counted on the consumer thread as it moves the
     position, and every drained batch stamped there with the counts (:class:`SeekLedger`):
     :meth:`TunedConsumer.getmany` leaves what was drained before its partition's latest seek,
     which reads it again. Faust's "already read" check against the read position is kept
     for changelogs only (:class:`ReadOffsets`); input topics are judged by the seek counts.
  2. When flow is suspended (a rebalance, shutdown), Faust's stream acknowledges the messages
     it skips without taking them in. Those acknowledgements no longer count towards a commit
     (:meth:`TunedConsumer.ack`); the message is read again from the committed offset.
  3. The check that no message before the first acknowledged one is missing was one off: with
     the committed offset at N (the next to read) and N itself never acknowledged, it let the
     commit pass N. :meth:`TunedConsumer._new_offset` commits only from N.
  4. Should a partition still wait for its first message (one cleared from a queue, say) for
     :data:`REFETCH_AFTER_S`, the consumer seeks back to the committed offsets and reads again:
     at-least-once, and the steps downstream recognise the repeats by event id.

- **Messages from before a rebalance** (found by the two-worker test in
  ``tests/test_reliability.py``). After a rebalance every partition is read again from its
  committed offset, but a message fetched before that seek could still reach an agent (queued
  for its stream during the tables' recovery with the new generation's id, or in an agent's
  hands), and was applied ahead of the earlier messages read again. :meth:`TunedConsumer.outdated`
  tells such a message (its partition revoked, an earlier generation, or drained before its
  partition's latest seek) and :func:`fresh` leaves it to be read again. An earlier version
  judged "before the seek" on the app's event loop, where the seek is known only once it has
  returned: records drained in between (aiokafka seeks partition after partition, awaiting
  each one's committed offset) were taken for old ones, left, and never read again, and the
  group stopped committing those partitions (the same test, about one run in ten). Two more
  of the kind: a message handed out before a rebalance no longer sets the read position after
  it (:meth:`ReadOffsets.revoked`), and the committed offsets Faust keeps no longer move
  backwards when a commit lands during the seek (:meth:`TunedConsumer.perform_seek`). And
  whatever the route, an input partition left with records past its committed offset, none in
  an agent's hands or acknowledged for :data:`REFETCH_AFTER_S`, is read again
  (:meth:`TunedConsumer._stalled`).
- **Hand-over in place** (``direct_hand_over``, off by default). Faust's fetch loop hands every
  message to its stream through four tasks; with this on, a delivery that finishes at once runs
  without them (:meth:`TunedConsumer._drain_messages`). Measured in ``docs/performance.md``:
  a lower tail at 500 events/s, less sustained throughput under ``e2e.py --max``.
- **Changelog partitions paused in aiokafka too.** Faust pauses a partition in its own books
  only, so every fetch request still named each table changelog partition the worker holds,
  outside recovery too, and the embedded broker spends CPU on every partition of every waiting
  fetch. The changelog partitions Faust holds paused are now paused in aiokafka as well, and
  resumed with Faust (:meth:`TunedConsumer._forward_changelog_pauses`).
- **Persistent tables.** Each commit brackets its producer flush for the RocksDB table store
  (``streams/store.py``): the table writes held when it begins are written to disk only after
  the flush has had their changelog records acknowledged, so local state never runs ahead of the
  changelog.
"""

from __future__ import annotations

import asyncio
import time
import types
import uuid
import weakref
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator, Mapping
from typing import Any, cast

import faust
import structlog
from aiokafka.errors import IllegalStateError
from confluent_kafka import Consumer, KafkaException, TopicPartition
from faust.transport.consumer import CONSUMER_FETCHING, ensure_TP
from faust.transport.drivers import aiokafka as driver
from faust.transport.producer import ProducerBuffer
from faust.types import TP
from faust.types.tuples import ack_lock
from mode.utils.futures import notify

from infra.kafka import consumer_config
from infra.settings import KafkaSettings
from streams.store import ChangelogBatches, keyed_stores

EndProbe = Callable[[Mapping[TP, int]], dict[TP, int]]
PROBE_WAIT_S = 0.5

#: Seconds a partition's commit may wait on a missing first message before the consumer seeks
#: back to the committed offsets to read it again.
REFETCH_AFTER_S = 10.0

log = structlog.get_logger(__name__)


class _ConsumerThread(driver.AIOKafkaConsumerThread):
    """Faust's aiokafka consumer thread with a set fetch wait and every seek counted in its
    :class:`SeekLedger`, in the thread's event loop step that moves the position."""

    fetch_max_wait_ms = 1500

    def __post_init__(self) -> None:
        super().__post_init__()
        self.ledger = SeekLedger()

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = self.fetch_max_wait_ms  # aiokafka reads it in start()
        seek, ledger = consumer.seek, self.ledger

        def counted_seek(tp: Any, offset: int) -> None:  # Faust's seek_wait (recovery) too
            seek(tp, offset)
            ledger.moved(tp, offset)

        consumer.seek = counted_seek
        return consumer

    def pause_changelogs(self, topics: set[str], paused: set[tuple[str, int]]) -> None:
        """Pause the assigned partitions of the ``topics`` named in ``paused``, resume the others
        (called on this thread; see ``TunedConsumer._forward_changelog_pauses``)."""
        consumer = self._consumer
        if consumer is None:
            return
        mine = [tp for tp in consumer.assignment() if tp.topic in topics]
        stop = [tp for tp in mine if (tp.topic, tp.partition) in paused]
        go = [tp for tp in mine if (tp.topic, tp.partition) not in paused]
        consumer.pause(*stop)
        consumer.resume(*go)

    async def seek_here(self, tp: TP, offset: int) -> None:
        """Seek on this thread (Faust's own ``seek`` moves the position from the app's loop)."""
        self._ensure_consumer().seek(tp, offset)

    async def seek_to_committed(self) -> Mapping[TP, int]:
        return cast(Mapping[TP, int], await self.call_thread(self._seek_to_committed))

    async def _seek_to_committed(self) -> dict[TP, int | None]:
        # aiokafka's seek_to_committed awaits each partition's committed offset in turn and
        # moves each position as it comes: count each seek in that step.
        consumer = self._ensure_consumer()
        committed: dict[TP, int | None] = {}
        for tp in consumer.assignment():
            offset = (await consumer.seek_to_committed(tp))[tp]
            committed[tp] = offset
            if offset and offset > 0:  # aiokafka seeks only then
                self.ledger.moved(tp, offset)
        return committed

    async def seek_to_beginning(self, *partitions: Any) -> None:
        await self.call_thread(self._seek_to_beginning, *partitions)

    async def _seek_to_beginning(self, *partitions: Any) -> None:
        consumer = self._ensure_consumer()
        for tp in partitions or consumer.assignment():
            self.ledger.moved(tp, None)
        # its first step (before any await) marks the positions for reset, so no record drained
        # after the counts above comes from before the seek
        await consumer.seek_to_beginning(*partitions)

    async def _fetch_records(
        self,
        consumer: Any,
        active_partitions: Any,
        timeout: float | None = None,
        max_records: int | None = None,
    ) -> Drained:
        records = await super()._fetch_records(
            consumer, active_partitions, timeout=timeout, max_records=max_records
        )
        # nothing is awaited between aiokafka's drain and here: these are the drain's counts
        return Drained(records, {tp: self.ledger.count(tp) for tp in records})


#: How long a flush waits for the producer buffer to empty before it lets the commit go on.
FLUSH_DEADLINE_S = 2.0


class DrainingBuffer(ProducerBuffer):
    """Faust's producer buffer with a :meth:`flush` that waits until nothing is pending, for at
    most :data:`FLUSH_DEADLINE_S` (an unbounded wait can hold the consumer's fetcher, which
    awaits a commit every ``broker_commit_every`` messages)."""

    async def flush(self) -> None:
        deadline = time.monotonic() + FLUSH_DEADLINE_S
        while self.size and self.state == "running" and time.monotonic() < deadline:
            self.message_sent.clear()
            try:
                await asyncio.wait_for(self.message_sent.wait(), timeout=0.1)
            except TimeoutError:
                continue  # the sender is slow, not done: keep waiting
        if self.size:  # stopping, or past the deadline: Faust's own flush
            await super().flush()


class _DrainingProducer(driver.Producer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        buffer = DrainingBuffer(loop=self.loop, beacon=self.beacon)
        buffer.app = self.app
        self.buffer = buffer

    async def flush(self) -> None:
        """Send the write-behind tables' changelog records, then flush as Faust does."""
        await cast(TunedApp, self.app).changelog_batches.send()
        await super().flush()


def read_true_ends(kafka: KafkaSettings, reported: Mapping[TP, int]) -> dict[TP, int]:
    """``reported`` end offsets, each raised to one past the last record actually there."""
    ends = dict(reported)
    starts = [TopicPartition(tp.topic, tp.partition, end - 1) for tp, end in ends.items() if end]
    if not starts:
        return ends
    group = f"recstream-end-probe-{uuid.uuid4().hex}"
    probe = Consumer(consumer_config(kafka, group, **{"enable.auto.commit": False}))
    try:
        probe.assign(starts)
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            batch = probe.consume(1000, timeout=PROBE_WAIT_S)
            if not batch:
                break
            for msg in batch:
                if msg.error() is None:
                    tp = TP(msg.topic() or "", msg.partition() or 0)
                    ends[tp] = max(ends[tp], (msg.offset() or 0) + 1)
    finally:
        probe.close()
    return ends


def changelog_ends(kafka: KafkaSettings, tps: list[TP]) -> dict[TP, int]:
    """One past the last record of each partition (0 for a topic that does not exist)."""
    probe = Consumer(consumer_config(kafka, f"recstream-end-probe-{uuid.uuid4().hex}"))
    try:
        reported: dict[TP, int] = {}
        for tp in tps:
            try:
                _, high = probe.get_watermark_offsets(
                    TopicPartition(tp.topic, tp.partition), timeout=10
                )
            except KafkaException:
                high = 0  # no such topic or partition: nothing to recover from
            reported[tp] = max(int(high), 0)
    finally:
        probe.close()
    return read_true_ends(kafka, reported)


def is_input(tp: Any) -> bool:
    """Whether ``tp`` is an input partition, not a table's changelog or Faust's assignor topic."""
    return not tp.topic.endswith("-changelog") and "__assignor" not in tp.topic


class SeekLedger:
    """How many times each partition has been sought, and where to, counted on the consumer's
    thread.

    aiokafka moves a partition's position and drains fetched records on the consumer thread's
    event loop. Every seek the app makes runs there (:class:`_ConsumerThread`) and is counted in
    the same step of that loop as the position moves, and each drained batch is stamped with
    its partitions' counts in the step that drained it (:class:`Drained`). So a record whose
    stamp is below its partition's count now was drained before the partition's latest seek,
    which reads it again (a seek goes back to a committed offset, never past an unprocessed
    record); a record stamped with the current count was drained after it, and is not read
    again. Counted anywhere else (the app's event loop, say, after the seek returned), a seek
    and a drain could fall in either order: records drained just after a seek were then taken
    for records from before it, left, and never read again.
    """

    def __init__(self) -> None:
        self._sought: dict[TP, tuple[int, int | None]] = {}  # tp -> (count, target); one write

    def moved(self, tp: TP, target: int | None) -> None:
        """``tp`` was just sought to ``target`` (None: its beginning). Consumer thread only."""
        self._sought[tp] = (self.count(tp) + 1, target)

    def count(self, tp: TP) -> int:
        return self.latest(tp)[0]

    def stale(self, tp: TP, stamp: int) -> bool:
        """Whether a record of ``tp`` drained at seek count ``stamp`` predates its latest seek."""
        return self.count(tp) > stamp

    def latest(self, tp: TP) -> tuple[int, int | None]:
        """``tp``'s seek count and the target of its latest seek."""
        return self._sought.get(tp, (0, None))


class Drained(dict[Any, Any]):
    """A drained batch of records by partition, with each partition's seek count at the drain."""

    def __init__(self, records: Mapping[Any, Any], counts: dict[TP, int]) -> None:
        super().__init__(records)
        self.counts = counts


class ReadOffsets(defaultdict[TP, int | None]):
    """Faust's read position per partition, kept right across seeks.

    Faust's fetcher stores each message's offset here after handing it to its stream, and drops
    any later message below it as already read; a seek stores its target. Here the position
    is set to a seek's target before the first record drained after that seek is handed out
    (:meth:`handing_out`), whenever Faust's own store of the target comes, and a message drained
    before its partition's latest seek cannot move the position (it may still be in the
    fetcher's hands when the seek lands). Nor can a message handed out before a rebalance:
    Faust clears the revoked partitions' positions, and the message then in the fetcher's hands
    (its stream's queue full, say) stored its offset afterwards, so that after the new
    assignment the records read again from the committed offset, up to that offset, were
    dropped as already read while the later ones went through: a user's newest event was
    applied before the ones just before it (found by the two-worker test)."""

    def __init__(self, ledger: SeekLedger) -> None:
        super().__init__(lambda: None)
        self.ledger = ledger
        self._reading: tuple[TP, int] | None = None  # the partition and stamp of the message out
        self._applied: dict[TP, int] = {}  # the seek count whose target is set, per partition
        self._rebalanced = False  # a rebalance began after the message out was handed out

    def revoked(self) -> None:
        """A rebalance has begun: the message in the fetcher's hands, if any, is from before it."""
        self._rebalanced = True

    def __getitem__(self, tp: TP) -> int | None:
        # Faust's fetcher reads the position here to drop records below it as already read
        # (and to count a jump past it as acknowledged, for compacted topics). For input
        # topics the seek counts decide instead (TunedConsumer.getmany drops exactly the
        # records drained before their partition's latest seek; a record is not drained twice
        # otherwise), so nothing is dropped here: a position left too high by any route can
        # no longer hide the records read again. Changelogs keep Faust's check.
        if is_input(tp):
            return None
        return super().__getitem__(tp)

    def position(self, tp: TP) -> int | None:
        """The offset of the last message of ``tp`` handed out (input topics included)."""
        return dict.get(self, tp)

    def handing_out(self, tp: TP, stamp: int) -> None:
        """A record of ``tp`` drained at seek count ``stamp`` (the current one) goes out."""
        if self._applied.get(tp, 0) < stamp:
            count, target = self.ledger.latest(tp)
            if count == stamp:
                super().__setitem__(tp, target if target else None)
                self._applied[tp] = stamp
        self._reading = (tp, stamp)
        self._rebalanced = False

    def __setitem__(self, tp: TP, offset: int | None) -> None:
        # Stored for a message handed out before a rebalance, or drained before the seek that
        # has just moved tp: leave it (the seek's own target is always right).
        reading = self._reading
        if reading is not None and reading[0] == tp:
            if self._rebalanced:
                return
            if self.ledger.stale(tp, reading[1]) and offset != self.ledger.latest(tp)[1]:
                return
        super().__setitem__(tp, offset)


def fresh(events: list[Any], outdated: Callable[[Any], bool] | None, step: str) -> list[Any]:
    """``events`` (Faust events) without those whose message is ``outdated``
    (:meth:`TunedConsumer.outdated`: its partition revoked, or fetched before the current group
    generation or its partition's latest seek). A rebalance seeks every partition back to its
    committed offset, so they are read again from there, or by the partition's new owner; taken
    now, they would come before the events read again, out of order."""
    if outdated is None:
        return events
    kept = [e for e in events if not outdated(e.message)]
    if len(kept) < len(events):
        log.info("outdated_events_skipped", step=step, events=len(events) - len(kept))
    return kept


#: Messages handed to the streams between two yields of the fetch loop to the event loop.
YIELD_EVERY = 100


@types.coroutine
def _carry_on(started: Coroutine[Any, Any, Any], awaited: Any) -> Generator[Any, Any, Any]:
    """Run the rest of ``started``, a coroutine already stepped once that is now waiting on
    ``awaited`` (what its step yielded), as if it had been awaited from the beginning: the
    task running this waits on ``awaited``, and whatever it sends or throws in goes on to
    ``started``."""
    while True:
        try:
            sent = yield awaited
        except BaseException as exc:  # noqa: BLE001 - a cancellation, passed on as it came
            try:
                awaited = started.throw(exc)
            except StopIteration as done:
                return done.value
        else:
            try:
                awaited = started.send(sent)
            except StopIteration as done:
                return done.value


async def _rest_of(started: Coroutine[Any, Any, Any], awaited: Any) -> Any:
    return await _carry_on(started, awaited)


def _transport_class(
    fetch_max_wait_ms: int, end_probe: EndProbe | None, hand_over_in_place: bool
) -> type[driver.Transport]:
    thread = type("ConsumerThread", (_ConsumerThread,), {"fetch_max_wait_ms": fetch_max_wait_ms})

    class TunedConsumer(driver.Consumer):
        """Faust's aiokafka consumer with the fixes to what it commits (see the module text)."""

        #: Hand fetched messages over in place when they can be (:meth:`_drain_messages`).
        direct_hand_over: bool = hand_over_in_place

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._ledger: SeekLedger = cast(_ConsumerThread, self._thread).ledger
            self._read_offset = ReadOffsets(self._ledger)
            self._drained: Drained = Drained({}, {})  # the batch being handed out
            # the seek count at which each message handed out was drained (see outdated)
            self._drained_at: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
            self._missing_since: dict[TP, float] = {}
            self._acked_at: dict[TP, float] = {}  # when each partition last had an ack counted
            self._quiet_since: dict[TP, float] = {}  # see _stalled
            self._store_commit = asyncio.Lock()
            self._owned: set[TP] = set()  # the partitions assigned, until they are revoked
            # Faust's fetcher also commits itself every ``broker_commit_every`` messages, and
            # waits for that commit (or for the one under way) before it hands on another
            # message: with the tables' writes in every commit, that held input back for as long
            # as a commit took, hundreds of milliseconds at 500 events/s. Commits come from the
            # commit timer alone (every ``broker_commit_interval``).
            self._commit_every = None

        async def on_partitions_revoked(self, revoked: set[TP]) -> None:
            self._owned.difference_update(revoked)
            cast(ReadOffsets, self._read_offset).revoked()
            await super().on_partitions_revoked(revoked)

        async def on_partitions_assigned(self, assigned: set[TP], generation_id: int = 0) -> None:
            self._owned = set(assigned)
            await super().on_partitions_assigned(assigned, generation_id)

        def _new_consumer_thread(self) -> Any:
            return thread(self, loop=self.loop, beacon=self.beacon)

        def pause_partitions(self, tps: Any) -> None:
            super().pause_partitions(tps)
            self._forward_changelog_pauses()

        def resume_partitions(self, tps: Any) -> None:
            super().resume_partitions(tps)
            self._forward_changelog_pauses()

        def _forward_changelog_pauses(self) -> None:
            """Pause in aiokafka the changelog partitions Faust has paused (and resume the rest).

            Faust pauses a partition in its own books only, so aiokafka went on naming every
            table changelog partition in each fetch request while nothing read them outside
            recovery; the embedded broker spends CPU on every partition of every waiting fetch.
            The state is applied on the consumer thread, in call order."""
            consumer_thread = cast(_ConsumerThread, self._thread)
            loop = consumer_thread.thread_loop
            if loop.is_closed():
                return
            changelogs = set(self.app.tables.changelog_topics)
            paused = {(tp.topic, tp.partition) for tp in self._paused_partitions}
            paused = {key for key in paused if key[0] in changelogs}
            loop.call_soon_threadsafe(consumer_thread.pause_changelogs, changelogs, paused)

        async def _seek(self, partition: TP, offset: int) -> None:
            # on the consumer thread, counted there (Faust moves the position from this loop)
            consumer_thread = cast(_ConsumerThread, self._thread)
            await consumer_thread.call_thread(consumer_thread.seek_here, partition, offset)

        async def _getmany(self, active_partitions: Any, timeout: float) -> Any:
            records = await super()._getmany(active_partitions, timeout)
            self._drained = records if isinstance(records, Drained) else Drained(records, {})
            return records

        async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Any]]:
            ledger, offsets = self._ledger, cast(ReadOffsets, self._read_offset)
            async for tp, message in super().getmany(timeout):
                stamp = self._drained.counts.get(tp, 0)
                if ledger.stale(tp, stamp):
                    continue  # drained before the partition's latest seek, which reads it again
                offsets.handing_out(tp, stamp)
                self._drained_at[message] = stamp
                yield tp, message

        async def _drain_messages(self, fetcher: Any) -> None:
            """Faust's fetch loop: hand each fetched message to the streams of its topic, and
            record its offset as read.

            Faust hands each message over through ``wait_first(callback, suspend_flow)``: four
            tasks started and three cancelled per message, so that a rebalance or a stop can
            interrupt a hand-over blocked on a full stream queue. Nearly every hand-over
            finishes at once, without awaiting anything, so with ``direct_hand_over`` it is
            stepped first in place (:meth:`_hand_over`) and goes through ``wait_first`` only
            when it must wait; a worker at full load spent about an eighth of its time in that
            machinery. Without it, Faust's own loop runs. The rest is as in Faust's loop: the
            read position check (off for input topics, see :class:`ReadOffsets`), the gaps of
            compacted topics, and a yield to the event loop every :data:`YIELD_EVERY`
            messages. The consumer never commits from here (see
            ``_commit_every``)."""
            if not self.direct_hand_over:
                await super()._drain_messages(fetcher)
                return
            deliver = self.callback
            offsets = self._read_offset
            acks_enabled_for = self.app.topics.acks_enabled_for
            stopped, fetcher_stopped = self._stopped.is_set, fetcher._stopped.is_set
            diag = self.diag
            since_yield = 0
            try:
                while not (stopped() or fetcher_stopped()):
                    diag.set_flag(CONSUMER_FETCHING)
                    fetched = self.getmany(timeout=1.0)
                    await asyncio.sleep(0)  # getmany may not yield to the loop for a while
                    if not self.should_stop:
                        async for tp, message in fetched:
                            since_yield += 1
                            if since_yield > YIELD_EVERY:
                                await asyncio.sleep(0)
                                since_yield = 0
                            offset, read = message.offset, offsets[tp]
                            if read is not None and offset < read:
                                continue  # already read (a changelog's record, read again)
                            if read and offset - read > 1 and acks_enabled_for(message.topic):
                                await self._add_gap(tp, read + 1, offset)
                            await self._hand_over(deliver(message))
                            offsets[tp] = offset
                    diag.unset_flag(CONSUMER_FETCHING)
            except self.consumer_stopped_errors:
                if self.transport.app.should_stop:
                    log.info("consumer_stopped_by_broker")
                    return
                raise
            except asyncio.CancelledError:
                if self.transport.app.should_stop:
                    return
                raise
            finally:
                diag.unset_flag(CONSUMER_FETCHING)

        async def _hand_over(self, delivery: Awaitable[Any]) -> None:
            """Run ``delivery`` (Faust's callback for one message) to its end, or until flow
            is suspended or the consumer stops, as Faust's ``wait_first`` does; without a
            task when it is a coroutine that finishes in its first step."""
            halted = self.suspend_flow.is_set() or self._stopped.is_set() or self._crashed.is_set()
            if isinstance(delivery, Coroutine) and not halted:
                try:
                    awaited = delivery.send(None)
                except StopIteration:
                    return  # handed over at once: the stream's queue had room
                delivery = _rest_of(delivery, awaited)
            await self.wait_first(delivery, self.suspend_flow.wait())

        def outdated(self, message: Any) -> bool:
            """Whether ``message`` is no longer this consumer's to take: its partition has been
            revoked, it was fetched in an earlier group generation, or drained before its
            partition's latest seek (:class:`SeekLedger`). Each is read again, by this worker
            from its committed offset or by the partition's new owner, so an outdated
            message's acknowledgement does not count towards a commit (:meth:`ack`)."""
            generation = message.generation_id
            stamp = self._drained_at.get(message)
            stale = (
                message.tp not in self._owned
                or (generation is not None and generation != self.app.consumer_generation_id)
                or (stamp is not None and self._ledger.stale(message.tp, stamp))
            )
            if stale:
                message.tracked = False
            return stale

        def ack(self, message: Any) -> bool:
            if message.tracked:  # a stream took it in: processed, or filtered on purpose
                self._acked_at[message.tp] = time.monotonic()
                return bool(super().ack(message))
            # (an outdated message, left by the agent that took it, is released the same way)
            # Faust's stream acknowledges the messages it skips, untaken, while flow is suspended
            # (a rebalance, shutdown) or after a newer generation began. Release such a message
            # without counting it: its offset is not committed and it is read again.
            with ack_lock:
                if not message.acked:
                    message.acked = True
                    self._unacked_messages.discard(message)
                    notify(self._waiting_for_ack)
            return False

        def _new_offset(self, tp: TP) -> int | None:
            committed = self._committed_offset[tp]
            acked = self._acked[tp]
            head_missing = committed is not None and acked and min(acked) > committed
            if head_missing and not self._gap[tp].overlaps(committed):  # a gap may cover it
                self._missing_since.setdefault(tp, time.monotonic())
                return None
            self._missing_since.pop(tp, None)
            return super()._new_offset(tp)

        async def commit(self, *args: Any, **kwargs: Any) -> bool:
            async with self._store_commit:
                app = cast(TunedApp, self.app)
                # Nothing is awaited from here until the offsets are chosen: the writes of every
                # input they cover are set aside, and the commit's producer flush writes them
                # and sends their changelog records before the offsets are committed.
                for flush in app.before_commit:
                    flush()
                app.changelog_batches.commit_started()
                try:
                    did_commit = bool(await super().commit(*args, **kwargs))
                finally:
                    app.changelog_batches.commit_ended()
                for store in keyed_stores(app):
                    if did_commit:  # the flush ran: every record of the snapshot is acked
                        store.finish_commit()
                    else:
                        store.drop_snapshot()
            now = time.monotonic()
            waiting = [tp for tp, t in self._missing_since.items() if now - t >= REFETCH_AFTER_S]
            for tp in waiting:
                del self._missing_since[tp]
            await self._read_again("refetch_missing", waiting)
            stalled = self._stalled(now)
            for tp in stalled:
                self._quiet_since[tp] = now
            await self._read_again("refetch_stalled", stalled)
            return did_commit

        async def _read_again(self, event: str, tps: list[TP]) -> None:
            """Seek ``tps`` back to their committed offsets, and log ``event`` naming them."""
            tps = [tp for tp in tps if self._committed_offset.get(tp) is not None]
            if not tps or self.should_stop:  # (stopping: the next start reads from there)
                return
            log.warning(
                event,
                partitions={f"{tp.topic}:{tp.partition}": self._committed_offset[tp] for tp in tps},
            )
            for tp in tps:
                await self.seek(tp, cast(int, self._committed_offset[tp]))

        def lagging(self) -> bool:
            """Whether an input partition held here has records past those handed out, as
            far as the latest fetch answers tell (the broker's end offset against the read
            position, or the committed offset before the first message)."""
            for tp in self._owned:
                if not is_input(tp):
                    continue
                read = cast(ReadOffsets, self._read_offset).position(tp)
                start = read + 1 if read is not None else self._committed_offset.get(tp)
                end = self._end(tp)
                if start is not None and end is not None and end > start:
                    return True
            return False

        def _end(self, tp: TP) -> int | None:
            """``tp``'s end offset as of the latest fetch answer (None: not known, or the
            partition is not assigned any more)."""
            try:
                return self.highwater(tp)
            except (IllegalStateError, AssertionError):  # not assigned (aiokafka asserts)
                return None

        def _stalled(self, now: float) -> list[TP]:
            """Input partitions with records past their committed offset of which nothing has
            been in an agent's hands or acknowledged for :data:`REFETCH_AFTER_S`: what was
            fetched for them went missing before an agent took it (left as outdated, say), and
            nothing else would read it again. The two-worker test found such stalls after
            rebalances more than once, each time by a different route (see
            ``docs/reliability.md``); reading again from the committed offset covers any route
            (at least once: the steps downstream recognise repeats by event id)."""
            if self.app.rebalancing or not self.flow_active:
                self._quiet_since.clear()
                return []
            in_hand = {message.tp for message in list(self._unacked_messages)}
            stalled = []
            for tp in self._owned:
                if not is_input(tp):
                    continue
                committed = self._committed_offset.get(tp)
                end = self._end(tp)
                if committed is None or end is None or end <= committed or tp in in_hand:
                    self._quiet_since.pop(tp, None)
                    continue
                since = max(self._quiet_since.setdefault(tp, now), self._acked_at.get(tp, 0.0))
                if now - since >= REFETCH_AFTER_S:
                    stalled.append(tp)
            return stalled

        async def perform_seek(self) -> None:
            """Seek every assigned partition to its committed offset, as Faust does, but never
            move the committed offset Faust keeps backwards: Faust resumes the stream
            partitions before this seek, so a commit can land while it goes on, partition after
            partition, and Faust then wrote the older offsets it had read over the newer ones
            (found with the broker's answers slowed down: the commits stalled, and were
            sought back and replayed once the missing head was noticed)."""
            committed = await self.seek_to_committed()
            for tp, offset in committed.items():
                key = ensure_TP(tp)
                self._read_offset[key] = offset if offset is not None and offset >= 0 else None
                if offset:
                    known = self._committed_offset.get(key)
                    self._committed_offset[key] = max(offset, known or 0)

        async def highwaters(self, *partitions: TP) -> Mapping[TP, int]:
            reported = await super().highwaters(*partitions)
            if end_probe is None:
                return reported
            return await asyncio.to_thread(end_probe, reported)

    class TunedTransport(driver.Transport):
        Consumer = TunedConsumer
        Producer = _DrainingProducer

    return TunedTransport


class TunedApp(faust.App):
    """``faust.App`` with a configurable consumer fetch wait, a draining producer flush and,
    given an ``end_probe``, changelog ends checked against the records really there.
    ``direct_hand_over``: fetched messages are handed to their streams in place when they can
    be (``TunedConsumer._drain_messages``) instead of through Faust's own loop, which the no-op
    ceiling benchmark always measures."""

    def __init__(
        self,
        *args: Any,
        fetch_max_wait_ms: int = 1500,
        end_probe: EndProbe | None = None,
        direct_hand_over: bool = False,
        **kwargs: Any,
    ) -> None:
        self._transport_cls = _transport_class(fetch_max_wait_ms, end_probe, direct_hand_over)
        #: Called at the start of every offset commit (:func:`streams.store.flush_before_commit`)
        self.before_commit: list[Callable[[], Any]] = []
        #: The write-behind tables' changelog records, sent by every producer flush
        self.changelog_batches = ChangelogBatches(self)
        super().__init__(*args, **kwargs)

    def _new_transport(self) -> Any:
        return self._transport_cls(self.conf.broker_consumer, self)
