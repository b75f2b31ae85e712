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
     were never seen again. :class:`FencedReadOffsets` and :meth:`TunedConsumer.getmany` drop
     what a fetch begun before a partition's seek returns for it, and seek that partition once
     more, so that everything from the seek target on is read again, in order.
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
  tells such a message (its partition revoked, an earlier generation, or fetched before its
  partition's latest seek) and :func:`fresh` leaves it to be read again.
- **Persistent tables.** Each commit brackets its producer flush for the RocksDB table store
  (``streams/store.py``): the table writes held when it begins are written to disk only after
  the flush has had their changelog records acknowledged, so local state never runs ahead of the
  changelog.
"""

from __future__ import annotations

import asyncio
import time
import uuid
import weakref
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, cast

import faust
import structlog
from confluent_kafka import Consumer, KafkaException, TopicPartition
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
    fetch_max_wait_ms = 1500

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = self.fetch_max_wait_ms  # aiokafka reads it in start()
        return consumer


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


class FencedReadOffsets(defaultdict[TP, int | None]):
    """The fetcher's read position per partition, which a batch fetched before a seek cannot move.

    Faust's fetcher stores each message's offset here after handing it to the streams
    (``__setitem__``) and drops any later message below it as already read. A seek (:meth:`fence`,
    or :meth:`update` from ``perform_seek``) sets a partition's position and starts a new epoch.
    :meth:`TunedConsumer.getmany` notes the epoch in which each fetch began (:attr:`reading`)
    and drops the messages of a partition sought since; the one message a batch may have in hand
    at the seek cannot store its offset. A dropped batch is sought again to the same target, so
    after a seek every message from the target on is read, once more and in order.
    """

    def __init__(self) -> None:
        super().__init__(lambda: None)
        self.epoch = 0  # counts seeks
        self.reading = 0  # the epoch in which the fetch being handed out began
        self._sought: dict[TP, tuple[int, int | None]] = {}  # tp -> (epoch, target) of its seek
        # the epoch in which each message handed out was fetched (see outdated)
        self._fetched_in: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()

    def fence(self, tp: TP, offset: int | None) -> None:
        """Set ``tp``'s position to a seek target; fetches begun before now become stale."""
        self.epoch += 1
        self._sought[tp] = (self.epoch, offset)
        super().__setitem__(tp, offset)

    def update(self, *args: Any, **kw: Any) -> None:  # perform_seek's route
        for tp, offset in dict(*args, **kw).items():
            self.fence(tp, offset)

    def stale(self, tp: TP, fetched_in: int) -> bool:
        """Whether a message of ``tp`` from a fetch begun in epoch ``fetched_in`` predates the
        partition's latest seek."""
        sought = self._sought.get(tp)
        return sought is not None and sought[0] > fetched_in

    def handed_out(self, message: Any, fetched_in: int) -> None:
        """Remember that ``message`` came from a fetch begun in epoch ``fetched_in``."""
        self._fetched_in[message] = fetched_in

    def outdated(self, message: Any) -> bool:
        """Whether ``message`` was fetched before its partition's latest seek. Such a message
        can still reach an agent after the seek (it was queued for its stream while a rebalance
        recovered the tables, say), although the seek reads it again: taken, it would come
        before the messages read again from the seek target."""
        fetched = self._fetched_in.get(message)
        return fetched is not None and self.stale(message.tp, fetched)

    def target(self, tp: TP) -> int | None:
        """Where ``tp`` was last sought to (None: no committed offset, so its beginning)."""
        return self._sought[tp][1]

    def __setitem__(self, tp: TP, offset: int | None) -> None:
        if not self.stale(tp, self.reading):
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


def _transport_class(fetch_max_wait_ms: int, end_probe: EndProbe | None) -> type[driver.Transport]:
    thread = type("ConsumerThread", (_ConsumerThread,), {"fetch_max_wait_ms": fetch_max_wait_ms})

    class TunedConsumer(driver.Consumer):
        """Faust's aiokafka consumer with the fixes to what it commits (see the module text)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._positions = FencedReadOffsets()
            self._read_offset = self._positions
            self._missing_since: dict[TP, float] = {}
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
            await super().on_partitions_revoked(revoked)

        async def on_partitions_assigned(self, assigned: set[TP], generation_id: int = 0) -> None:
            self._owned = set(assigned)
            await super().on_partitions_assigned(assigned, generation_id)

        def _new_consumer_thread(self) -> Any:
            return thread(self, loop=self.loop, beacon=self.beacon)

        async def seek(self, partition: TP, offset: int) -> None:
            await self._seek(partition, offset)
            self._positions.fence(partition, offset if offset else None)

        async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Any]]:
            positions = self._positions
            fetched_in = positions.epoch
            sought_again: set[TP] = set()
            async for tp, message in super().getmany(timeout):
                if positions.stale(tp, fetched_in):
                    # Fetched before (or while) its partition was sought: drop it, and seek once
                    # more to the same target so that the next fetch reads from there.
                    if tp not in sought_again:
                        sought_again.add(tp)
                        await self._seek_again(tp)
                    continue
                positions.reading = fetched_in
                positions.handed_out(message, fetched_in)
                yield tp, message

        def outdated(self, message: Any) -> bool:
            """Whether ``message`` is no longer this consumer's to take: its partition has been
            revoked, it was fetched in an earlier group generation, or before its partition's
            latest seek (:meth:`FencedReadOffsets.outdated`). Each is read again, by this
            worker from its committed offset or by the partition's new owner, so an outdated
            message's acknowledgement does not count towards a commit (:meth:`ack`)."""
            generation = message.generation_id
            stale = (
                message.tp not in self._owned
                or (generation is not None and generation != self.app.consumer_generation_id)
                or self._positions.outdated(message)
            )
            if stale:
                message.tracked = False
            return stale

        async def _seek_again(self, tp: TP) -> None:
            target = self._positions.target(tp)
            if target is None:
                # consumer_auto_offset_reset is "earliest"
                await self._thread.seek_to_beginning(tp)
                self._positions.fence(tp, None)
            else:
                await self.seek(tp, target)

        def ack(self, message: Any) -> bool:
            if message.tracked:  # a stream took it in: processed, or filtered on purpose
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
            if waiting:
                log.warning(
                    "refetch_missing",
                    partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in waiting),
                    committed=[self._committed_offset[tp] for tp in waiting],
                )
                for tp in waiting:
                    del self._missing_since[tp]
                    committed = self._committed_offset[tp]
                    if committed is not None:
                        await self.seek(tp, committed)
            return did_commit

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
    given an ``end_probe``, changelog ends checked against the records really there."""

    def __init__(
        self,
        *args: Any,
        fetch_max_wait_ms: int = 1500,
        end_probe: EndProbe | None = None,
        **kwargs: Any,
    ) -> None:
        self._transport_cls = _transport_class(fetch_max_wait_ms, end_probe)
        #: Called at the start of every offset commit (:func:`streams.store.flush_before_commit`)
        self.before_commit: list[Callable[[], Any]] = []
        #: The write-behind tables' changelog records, sent by every producer flush
        self.changelog_batches = ChangelogBatches(self)
        super().__init__(*args, **kwargs)

    def _new_transport(self) -> Any:
        return self._transport_cls(self.conf.broker_consumer, self)
