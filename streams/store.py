"""A RocksDB table store for Faust (through rocksdict): one database per table, keyed by key, so a
restarted worker recovers its tables from local disk and reads only the changelog written since.

Why not Faust's own ``rocksdb://`` store: it files each write under the partition of the event
being processed and, inside an agent, reads only from that partition's database. recstream's
co-visitation and popularity keys are items, written while processing users of every partition,
so a read there would miss the counts written under another partition. This store keeps one
database per table; reads and writes go by key alone, as with Faust's in-memory store.

**Local state never runs ahead of the changelog.** A table write is first held in memory (reads
see it at once). The consumer's commit (:func:`persist_tables`) first flushes the producer, so
every changelog record of the writes held when the commit began has been acknowledged by the
broker; only then are those writes, with the changelog offsets acknowledged so far, written to
RocksDB in one atomic batch. After a crash the database therefore holds a state the changelog
also holds, and recovery reads the changelog from the persisted offsets on: a write the crash
caught before its commit is read back from the changelog if its record was sent, and its input
is read again otherwise (at-least-once, repeats recognised by event id), exactly as with the
in-memory store.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Callable, Collection, Iterable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import structlog
from faust.stores import STORES, base
from faust.types import TP, EventT

log = structlog.get_logger(__name__)

SCHEME = "keyedrocks"
STORES.aliases[SCHEME] = "streams.store:KeyedRocksStore"

_OFFSET_PREFIX = b"\x00recstream-offset\x00"
_DELETED = object()  # a held delete (None is a valid "absent" answer elsewhere)


def _offset_key(tp: TP) -> bytes:
    return _OFFSET_PREFIX + f"{tp.topic}\x00{tp.partition}".encode()


class KeyedRocksStore(base.SerializedStore):
    """Faust table storage in one RocksDB database per table (``<tabledir>/<table>.rocks``)."""

    def __init__(self, url: Any, app: Any, table: Any, **kwargs: Any) -> None:
        super().__init__(url, app, table, **kwargs)
        self.db_path = Path(app.conf.tabledir) / f"{self.table_name}.rocks"
        self._held: dict[bytes, Any] = {}  # writes not yet in RocksDB: key -> value or _DELETED
        self._acked: dict[TP, int] = {}  # changelog offsets acknowledged, not yet persisted
        self._snapshot: tuple[dict[bytes, Any], dict[TP, int]] | None = None
        self.restored = 0  # changelog records applied by recovery since start
        self._db = self._open()

    def _open(self) -> Any:
        from rocksdict import Options, Rdict

        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return Rdict(str(self.db_path), options=Options(raw_mode=True))
        except Exception as exc:  # rocksdict raises a bare Exception for a held lock
            raise RuntimeError(
                f"cannot open table store {self.db_path}: {exc} (is another worker using "
                "the same RECSTREAM_DATA_DIR?)"
            ) from exc

    # --- reads and writes ---------------------------------------------------------------------

    def _get(self, key: bytes) -> bytes | None:
        held = self._held.get(key)
        if held is not None:
            return None if held is _DELETED else held
        value = self._db.get(key)
        return None if value is None else bytes(value)

    def _set(self, key: bytes, value: bytes | None) -> None:
        self._held[key] = _DELETED if value is None else value

    def _del(self, key: bytes) -> None:
        self._held[key] = _DELETED

    def put_encoded(self, key: bytes, value: bytes | None) -> None:
        """Write a row already encoded as this store encodes it (``value`` None: delete it)."""
        self._held[key] = _DELETED if value is None else value

    def _contains(self, key: bytes) -> bool:
        return self._get(key) is not None

    def _iteritems(self) -> Iterator[tuple[bytes, bytes]]:
        held = dict(self._held)
        for raw, value in self._db.items():
            key = bytes(raw)
            if key.startswith(_OFFSET_PREFIX) or key in held:
                continue
            yield key, bytes(value)
        for key, value in held.items():
            if value is not _DELETED:
                yield key, value

    def _iterkeys(self) -> Iterator[bytes]:
        return (k for k, _ in self._iteritems())

    def _itervalues(self) -> Iterator[bytes]:
        return (v for _, v in self._iteritems())

    def _size(self) -> int:
        return sum(1 for _ in self._iteritems())

    def _clear(self) -> None:
        self.reset_state()

    # --- changelog offsets and recovery -------------------------------------------------------

    def persisted_offsets(self) -> dict[TP, int]:
        """Every changelog partition's persisted offset (their keys sort first)."""
        out: dict[TP, int] = {}
        for raw, value in self._db.items(from_key=_OFFSET_PREFIX):
            key = bytes(raw)
            if not key.startswith(_OFFSET_PREFIX):
                break
            topic, partition = key[len(_OFFSET_PREFIX) :].decode().rsplit("\x00", 1)
            out[TP(topic, int(partition))] = int(bytes(value))
        return out

    def persisted_offset(self, tp: TP) -> int | None:
        value = self._db.get(_offset_key(tp))
        return None if value is None else int(bytes(value))

    def set_persisted_offset(self, tp: TP, offset: int) -> None:
        """Called as the broker acknowledges each changelog record: remembered, and written with
        the held writes at the next commit."""
        if offset > self._acked.get(tp, -1):
            self._acked[tp] = offset

    def apply_changelog_batch(
        self,
        batch: Iterable[EventT],
        to_key: Callable[[Any], Any],
        to_value: Callable[[Any], Any],
    ) -> None:
        """Recovery (and standby replicas): the records straight into RocksDB, with their offsets,
        in one atomic batch."""
        from rocksdict import WriteBatch

        write = WriteBatch(raw_mode=True)
        offsets: dict[TP, int] = {}
        count = 0
        for event in batch:
            msg = event.message
            if msg.key is None:
                raise TypeError(f"changelog record without a key: {msg}")
            if msg.value is None:
                write.delete(msg.key)
            else:
                write.put(msg.key, msg.value)
            offsets[msg.tp] = max(msg.offset, offsets.get(msg.tp, -1))
            count += 1
        for tp, offset in offsets.items():
            write.put(_offset_key(tp), str(offset).encode())
        self._db.write(write)
        self.restored += count

    def reset_state(self) -> None:
        """Forget every local row and offset (the changelog is untouched)."""
        self._held.clear()
        self._acked.clear()
        self._snapshot = None
        self._db.close()
        shutil.rmtree(self.db_path, ignore_errors=True)
        self._db = self._open()

    # --- the commit ---------------------------------------------------------------------------

    def begin_commit(self) -> None:
        """Before the producer flush: which held writes this commit may persist."""
        self._snapshot = (dict(self._held), dict(self._acked))

    def finish_commit(self) -> int:
        """After the flush (every record of the snapshot acknowledged): write the snapshot's
        writes and the offsets acknowledged by now; a key written again since stays held."""
        from rocksdict import WriteBatch

        if self._snapshot is None:
            return 0
        held, _ = self._snapshot
        self._snapshot = None
        write = WriteBatch(raw_mode=True)
        for key, value in held.items():
            if value is _DELETED:
                write.delete(key)
            else:
                write.put(key, value)
        acked = dict(self._acked)
        for tp, offset in acked.items():
            write.put(_offset_key(tp), str(offset).encode())
        self._db.write(write)
        for key, value in held.items():
            if self._held.get(key) is value:
                del self._held[key]
        for tp, offset in acked.items():
            if self._acked.get(tp) == offset:
                del self._acked[tp]
        return len(held)

    async def backup_partition(
        self, tp: TP | int, flush: bool = True, purge: bool = False, keep: int = 1
    ) -> None:
        """Backups are not kept: the changelog is the backup."""

    def restore_backup(self, tp: TP | int, latest: bool = True, backup_id: int = 0) -> None:
        """Backups are not kept: the changelog is the backup."""

    def drop_snapshot(self) -> None:
        self._snapshot = None

    async def on_recovery_completed(self, active_tps: set[TP], standby_tps: set[TP]) -> None:
        log.info(
            "table_recovered",
            table=self.table_name,
            changelog_records=self.restored,
            store=str(self.db_path),
        )


def keyed_stores(app: Any) -> list[KeyedRocksStore]:
    """The app's tables kept in :class:`KeyedRocksStore`."""
    return [t.data for t in app.tables.values() if isinstance(t.data, KeyedRocksStore)]


def reconcile(stores: Iterable[KeyedRocksStore], ends: Callable[[list[TP]], dict[TP, int]]) -> int:
    """Before the worker starts: empty every store whose persisted offsets the broker's changelog
    does not reach (``ends`` gives one past each partition's last record). That is a data
    directory kept while the topics were recreated, e.g. beside a fresh embedded broker; Faust
    would stop with a consistency error, or read on from offsets that mean nothing now. The
    emptied store is rebuilt from the whole changelog. Returns how many stores were emptied."""
    emptied = 0
    for store in stores:
        offsets = store.persisted_offsets()
        if not offsets:
            continue
        reach = ends(list(offsets))
        behind = {tp: o for tp, o in offsets.items() if o >= reach.get(tp, 0)}
        if behind:
            log.warning(
                "table_store_reset",
                table=store.table_name,
                reason="the changelog ends before the offsets this store persisted",
                partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in behind),
            )
            store.reset_state()
            emptied += 1
    return emptied


_ABSENT = object()


class WriteBehind(MutableMapping[str, Any]):
    """A Faust table whose writes wait in memory until the consumer's next offset commit, which
    writes each changed key once: to the table's store and to its changelog.

    A key a busy worker changes in every batch (a popular item's co-visitation counts, an active
    user's state) then costs one changelog record per commit interval instead of one per batch;
    reads see the newest value at once. :func:`flush_before_commit` hooks :meth:`flush` into
    the commit, before it computes the offsets to commit, with nothing awaited in between: the
    flush sets the held writes aside, so the writes of every input those offsets cover are the
    ones set aside. The commit's producer flush then writes them, a few hundred keys per turn
    of the event loop (:meth:`write_aside`, driven by :meth:`ChangelogBatches.send`), and sends
    their changelog records before the offsets are committed. So a crash loses only input whose
    offsets were not committed, and that input is read again (at-least-once, as with a write
    per batch), while a commit no longer holds the event loop for as long as its thousands of
    writes take. Held values are never changed in place (a write replaces the value), so a
    value set aside is the one its input produced.

    A rebalance does not commit (the app does not wait for its streams to empty), and after one
    every partition is read again from its committed offset. The held writes of keys whose
    changelog partition the worker gives up are therefore dropped (:meth:`drop`), set-aside
    ones not yet written included: the input they came from is read again by the partition's
    new owner, and written at this worker's next commit they would overwrite the state the new
    owner writes.
    """

    def __init__(
        self,
        table: Any,
        changelog: ChangelogBatches,
        encode: Callable[[Any], Any] | None = None,
    ) -> None:
        """``changelog``: where the writes go at a commit. ``encode``: turns a held value into
        the table's value when it is written (reads of a key changed since it was last written
        give the held value, others the table's)."""
        self.table = table  # the Faust table
        self.changelog = changelog
        self.encode = encode
        self._dirty: dict[str, Any] = {}  # key -> newest value, or _DELETED
        # set aside by flushes and not yet written, oldest first (a new tuple on every change:
        # the ranking thread reads it while the event loop writes)
        self._aside: tuple[dict[str, Any], ...] = ()
        self._writing: list[tuple[str, Any]] | None = None  # the oldest set-aside writes
        self._written = 0  # how many of them are in the table

    def get(self, key: str, default: Any = None) -> Any:
        value = self._dirty.get(key, _ABSENT)
        if value is _ABSENT:
            for held in reversed(self._aside):
                value = held.get(key, _ABSENT)
                if value is not _ABSENT:
                    break
            else:
                return self.table.get(key, default)
        return default if value is _DELETED else value

    def __getitem__(self, key: str) -> Any:
        value = self.get(key, _ABSENT)
        if value is _ABSENT:
            raise KeyError(key)
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        self._dirty[key] = value

    def __delitem__(self, key: str) -> None:
        if key not in self:
            raise KeyError(key)
        self._dirty[key] = _DELETED

    def __contains__(self, key: object) -> bool:
        return self.get(key, _ABSENT) is not _ABSENT  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[str]:
        held: dict[str, Any] = {}
        for layer in (*self._aside, self._dirty):
            held.update(layer)
        for key in self.table:
            if key not in held:
                yield key
        yield from (key for key, value in held.items() if value is not _DELETED)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def drop(self, partitions: Collection[int]) -> int:
        """Forget the held writes, set-aside ones not yet written included, of the keys whose
        changelog partition is one of ``partitions``; return how many."""
        if not partitions or not (self._dirty or self._aside):
            return 0
        table, changelog = self.table, self.changelog

        def given_up(key: str) -> bool:
            return changelog.partition(table, key).partition in partitions

        dropped = 0
        for layer in (self._dirty, *self._aside):
            if self._writing is not None and self._aside and layer is self._aside[0]:
                rest = self._writing[self._written :]  # the rest of the layer being written
                keep = [(k, v) for k, v in rest if not given_up(k)]
                gone = [k for k, _ in rest if given_up(k)]
                self._writing = self._writing[: self._written] + keep
            else:
                gone = [key for key in layer if given_up(key)]
            for key in gone:
                del layer[key]
            dropped += len(gone)
        return dropped

    @property
    def pending(self) -> int:
        """Keys changed since the last flush."""
        return len(self._dirty)

    def flush(self) -> int:
        """Set every key changed since the last flush aside for :meth:`write_aside` (and tell
        the changelog, whose next send writes them); return how many."""
        dirty = self._dirty
        if dirty:
            self._aside = (*self._aside, dirty)
            self._dirty = {}
            self.changelog.hold(self)
        return len(dirty)

    def write_aside(self, limit: int) -> bool:
        """Write up to ``limit`` set-aside keys to the table (store and changelog), oldest
        first; True once none is left.

        A layer of set-aside writes stays readable until all of it is in the table, so a read
        on another thread (the ranking's) finds each key in one or the other throughout."""
        while self._aside:
            if self._writing is None:
                self._writing, self._written = list(self._aside[0].items()), 0
            end = min(len(self._writing), self._written + limit)
            for key, value in self._writing[self._written : end]:
                self._write(key, value)
            limit -= end - self._written
            self._written = end
            if end < len(self._writing):
                return False
            self._aside, self._writing, self._written = self._aside[1:], None, 0
            if limit <= 0:
                break
        return not self._aside

    def _write(self, key: str, value: Any) -> None:
        table = self.table
        record = None if value is _DELETED else value if self.encode is None else self.encode(value)
        encoded = self.changelog.add(table, key, record)
        data = table.data
        if encoded is not None and isinstance(data, KeyedRocksStore):
            data.put_encoded(*encoded)  # the changelog's bytes are the store's
        elif record is None:
            with contextlib.suppress(KeyError):  # set and deleted since the last flush
                del data[key]
        else:
            data[key] = record


#: Set-aside writes written per turn of the event loop by a commit (a few milliseconds' work).
WRITE_CHUNK = 256
#: How many keys' changelog partitions are remembered per table before the memory is cleared
#: (about 200 bytes a key).
PLACES_KEPT = 50_000


class ChangelogBatches:
    """The changelog records of :class:`WriteBehind` tables, written at each commit and sent as
    record batches, a few per changelog partition, instead of one Faust message each.

    Faust sends each changelog record through its producer buffer, with a future and a
    ``send`` of its own: about 80 µs a record on the 2-core test machine, and a commit at 500
    events/s writes some 4,000 of them, which held the other messages in that buffer (lists,
    user updates) back for hundreds of milliseconds (``docs/performance.md``). Here :meth:`send`
    first writes the tables' set-aside writes (:meth:`WriteBehind.write_aside`), a chunk per
    turn of the event loop; each write's :meth:`add` turns the record into bytes as the table's
    changelog topic does (the same bytes go to the table's store) and picks its partition as
    Faust's producer does. Then it appends the records to aiokafka record batches, in the order
    they were added, and records each acknowledged offset with the table's store, as Faust's
    ``_on_changelog_sent`` does. The commit's producer flush awaits :meth:`send` before the
    producer's own flush (:class:`streams.transport.TunedApp`), so the offsets a commit writes
    still follow the records of every write it covers.

    The stores persist a commit's writes (:meth:`KeyedRocksStore.begin_commit`) once they are
    all written, before their records are sent: the first send after :meth:`commit_started`
    marks that point.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self._records: dict[tuple[Any, TP], list[tuple[bytes, bytes | None]]] = {}
        self._sending: asyncio.Lock | None = None  # one send at a time keeps each key in order
        self._held: list[WriteBehind] = []  # tables with set-aside writes, in flush order
        self._places: dict[str, dict[Any, tuple[TP, bytes]]] = {}
        self._tps: dict[TP, TP] = {}
        self._begin = False  # the next send begins the stores' commit

    def partition(self, table: Any, key: Any) -> TP:
        """The changelog partition of ``table`` that ``key``'s records go to."""
        return self._place(table, key)[0]

    def _place(self, table: Any, key: Any) -> tuple[TP, bytes]:
        topic = table.changelog_topic
        name = topic.get_topic_name()
        places = self._places.setdefault(name, {})
        place = places.get(key)
        if place is None:
            raw_key, _ = topic.prepare_key(key, table.key_serializer)
            tp = self.app.producer.key_partition(name, raw_key)
            place = (self._tps.setdefault(tp, tp), raw_key)  # one TP object per partition
            if len(places) >= PLACES_KEPT:
                places.clear()
            places[key] = place
        return place

    def add(self, table: Any, key: Any, value: Any) -> tuple[bytes, bytes | None]:
        """Queue the changelog record of ``key`` (``value`` None: a tombstone); return its key
        and value as bytes."""
        tp, raw_key = self._place(table, key)
        raw_value = None
        if value is not None:
            raw_value, _ = table.changelog_topic.prepare_value(value, table.value_serializer)
        self._records.setdefault((table, tp), []).append((raw_key, raw_value))
        return raw_key, raw_value

    def hold(self, view: WriteBehind) -> None:
        """``view`` has writes set aside: the next :meth:`send` writes them."""
        if not any(held is view for held in self._held):  # a mapping's == compares contents
            self._held.append(view)

    def commit_started(self) -> None:
        """A commit has set its writes aside: the next send begins the stores' commit."""
        self._begin = True

    def commit_ended(self) -> None:
        self._begin = False

    async def send(self) -> None:
        """Write the set-aside writes, hand every queued record to the producer and wait for
        the broker's acknowledgement."""
        if self._sending is None:
            self._sending = asyncio.Lock()
        async with self._sending:
            for view in self._held:
                while not view.write_aside(WRITE_CHUNK):
                    await asyncio.sleep(0)
            self._held = []
            if self._begin:
                self._begin = False
                for store in keyed_stores(self.app):  # the writes this commit may persist
                    store.begin_commit()
            records, self._records = self._records, {}
            if records:
                await self._send(records)

    async def _send(self, records: dict[tuple[Any, TP], list[tuple[bytes, bytes | None]]]) -> None:
        producer = self.app.producer._ensure_producer()  # aiokafka's AIOKafkaProducer
        sent: list[tuple[Any, TP, int, asyncio.Future[Any]]] = []
        appended = 0
        for (table, tp), rows in records.items():
            batch, count = producer.create_batch(), 0
            for key, value in rows:
                if batch.append(key=key, value=value, timestamp=None) is None:
                    future = await producer.send_batch(batch, tp.topic, partition=tp.partition)
                    sent.append((table, tp, count, future))
                    batch, count = producer.create_batch(), 0
                    if batch.append(key=key, value=value, timestamp=None) is None:
                        raise ValueError(
                            f"changelog record of {len(value or b'')} bytes does not fit a "
                            f"batch of {tp.topic}"
                        )
                count += 1
                appended += 1
                if appended % WRITE_CHUNK == 0:
                    await asyncio.sleep(0)
            future = await producer.send_batch(batch, tp.topic, partition=tp.partition)
            sent.append((table, tp, count, future))
        for table, tp, count, future in sent:
            meta = await future
            if meta is not None:  # the base offset of the batch
                table.data.set_persisted_offset(tp, meta.offset + count - 1)


def flush_before_commit(app: Any, tables: Iterable[WriteBehind]) -> None:
    """Flush ``tables``, in this order, at the start of every offset commit of ``app`` (a
    :class:`streams.transport.TunedApp`)."""
    app.before_commit.extend(t.flush for t in tables)
