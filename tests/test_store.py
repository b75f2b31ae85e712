"""The RocksDB table store: what reaches disk, when, and what a restarted worker reads back."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import faust
import pytest
from conftest import Stack, catalogue
from faust.types import TP

from consumers.consumer import read_topic
from infra.settings import Settings
from models.state import UserState
from schemas.topics import BEHAVIOR, TopicSpec
from streams.sinks import partition_of
from streams.store import KeyedRocksStore, WriteBehind, reconcile
from streams.topology import create_app, user_tables

CHANGELOG = TP("recstream-user-state-changelog", 0)


def _store(datadir: Path) -> KeyedRocksStore:
    """A table's store, as a worker's app builds it (no broker is contacted)."""
    app = faust.App(
        "store-test",
        broker="kafka://127.0.0.1:1",
        datadir=str(datadir),
        store="keyedrocks://",
        key_serializer="raw",
        value_serializer="raw",
    )
    store = app.Table("user-state", default=None).data
    assert isinstance(store, KeyedRocksStore)
    return store


def _record(key: bytes, value: bytes | None, offset: int) -> SimpleNamespace:
    message = SimpleNamespace(key=key, value=value, tp=CHANGELOG, offset=offset)
    return SimpleNamespace(message=message)


def test_writes_reach_disk_only_through_a_commit_and_never_ahead_of_it(tmp_path: Path) -> None:
    """A write is readable at once but on disk only after a commit that began after it: a write
    made during the commit's flush stays in memory (its changelog record may not be sent yet), a
    delete is a delete on disk, and the acknowledged changelog offset is persisted with the
    writes. A store reopened from the same directory holds exactly the committed state."""
    store = _store(tmp_path)
    store._set(b"u1", b"v1")
    store._set(b"u2", b"v2")
    assert store._get(b"u1") == b"v1"
    store.set_persisted_offset(CHANGELOG, 7)
    store.set_persisted_offset(CHANGELOG, 5)  # acknowledgements may arrive out of order
    store.begin_commit()
    store._set(b"u1", b"v1-newer")  # during the flush: not covered by this commit
    store._del(b"u2")
    assert store._get(b"u2") is None
    assert store.finish_commit() == 2
    assert store._get(b"u1") == b"v1-newer"

    store._db.close()
    reopened = _store(tmp_path)
    assert reopened._get(b"u1") == b"v1"  # the committed value, not the one written after
    assert reopened._get(b"u2") == b"v2"  # the delete came after the commit began
    assert reopened.persisted_offset(CHANGELOG) == 7
    assert dict(reopened._iteritems()) == {b"u1": b"v1", b"u2": b"v2"}

    reopened.begin_commit()
    reopened.drop_snapshot()  # a commit that did not happen persists nothing
    assert reopened.finish_commit() == 0


def test_recovery_writes_changelog_records_and_their_offsets(tmp_path: Path) -> None:
    """Changelog records applied by recovery go straight to disk with their offset (a tombstone
    deletes), are counted, and a reset forgets every row and offset."""
    store = _store(tmp_path)
    batch = [_record(b"a", b"1", 3), _record(b"b", b"2", 4), _record(b"a", None, 5)]
    store.apply_changelog_batch(batch, lambda k: k, lambda v: v)
    assert store.restored == 3
    assert store._get(b"a") is None
    assert store._get(b"b") == b"2"
    assert store.persisted_offset(CHANGELOG) == 5
    assert store._size() == 1
    store.reset_state()
    assert store._size() == 0
    assert store.persisted_offset(CHANGELOG) is None


def test_a_store_the_changelog_does_not_reach_is_emptied_before_start(tmp_path: Path) -> None:
    """A store whose persisted offsets lie at or past the changelog's end (its topics were
    recreated, e.g. a fresh embedded broker beside a kept data directory) is emptied, so Faust
    rebuilds it from the changelog; one the changelog reaches is kept as it is."""
    store = _store(tmp_path)
    other = TP("recstream-user-state-changelog", 1)
    store.apply_changelog_batch([_record(b"a", b"1", 7)], lambda k: k, lambda v: v)
    store.set_persisted_offset(other, 2)
    store.begin_commit()
    store.finish_commit()
    assert store.persisted_offsets() == {CHANGELOG: 7, other: 2}
    assert reconcile([store], lambda tps: {CHANGELOG: 8, other: 3}) == 0
    assert store._get(b"a") == b"1"
    assert reconcile([store], lambda tps: {CHANGELOG: 8, other: 2}) == 1
    assert store._get(b"a") is None
    assert store.persisted_offsets() == {}
    assert reconcile([store], lambda tps: {}) == 0  # nothing persisted: nothing to check


def test_a_second_worker_on_the_same_data_dir_is_told_why(tmp_path: Path) -> None:
    """Two stores on one directory: the second fails with a message naming the data dir, not a
    bare RocksDB lock error."""
    first = _store(tmp_path)
    with pytest.raises(RuntimeError, match="RECSTREAM_DATA_DIR"):
        _store(tmp_path)
    first._db.close()


def _recovered(stack: Stack, table: str) -> set[int]:
    """The changelog records each recovery of ``table`` read, from the worker's whole log."""
    pattern = rf"table_recovered\s+changelog_records=(\d+)\s+store=\S*/{re.escape(table)}\.rocks"
    return {int(n) for n in re.findall(pattern, stack.log_path.read_text(errors="replace"))}


@pytest.mark.stack
def test_a_restarted_worker_reads_its_tables_from_disk(settings: Settings, tmp_path: Path) -> None:
    """After a clean stop, a worker restarted on the same data directory recovers its user-state
    table from RocksDB: it reads none of the changelog's records again, and the user's state is
    intact (the next event's list still excludes every item bought before the restart)."""
    items = catalogue(24)
    first = Stack(settings, tmp_path / "run1")
    try:
        first.publish(*items)
        first.wait_committed("recstream.encode-requests.v1", len(items))
        bought = [i["item_id"] for i in items[:12]]
        events = [
            {"type": "purchase", "user_id": f"u{n % 4}", "item_id": item, "event_id": f"e{n}"}
            for n, item in enumerate(bought * 2)
        ]
        first.publish(*events)
        first.wait_committed(BEHAVIOR.name, len(events))
        first.wait_for(lambda b: b.get("trigger_event_id") == "e23", "the last event's list")
    finally:
        first.stop()
    assert _recovered(first, "user-state") == {0}  # a fresh store: nothing to read

    second = Stack(settings, tmp_path / "run2")
    try:
        second.publish({"type": "view", "user_id": "u3", "item_id": "i20", "event_id": "late"})
        body = second.wait_for(lambda b: b.get("trigger_event_id") == "late", "a list")
        mine = set(bought[3::4])  # u3 bought items 3, 7, 11
        assert not mine & {i["item_id"] for i in body["items"]}
    finally:
        second.stop()
    assert _recovered(second, "user-state") == {0}


class _Table:
    """The part of a Faust table that :class:`WriteBehind` uses: its store (``data``) and reads;
    it also stands for the changelog sink, recording the records added, in order, and the
    tables that have writes set aside."""

    def __init__(self, data: dict[str, object]) -> None:
        self.data = data
        self.changelog: list[tuple[str, object]] = []
        self.held: list[WriteBehind] = []

    def get(self, key: str, default: object = None) -> object:
        return self.data.get(key, default)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self.data))

    def add(self, table: object, key: str, value: object) -> None:
        assert table is self
        self.changelog.append((key, value))

    def hold(self, view: WriteBehind) -> None:
        self.held.append(view)

    def partition(self, table: object, key: str) -> TP:
        """Key ``u<n>`` is on changelog partition n mod 4."""
        assert table is self
        return TP("changelog", int(key[1:]) % 4)


def test_write_behind_writes_each_changed_key_once_after_the_flush() -> None:
    """Reads see every write at once, but the table and its changelog get nothing until a
    flush sets the writes aside and the commit writes them: each changed key once with its
    newest value (a key written in three batches is one changelog record, a delete is a
    tombstone and removes the stored row, a key set and deleted between flushes is a tombstone
    too), a few keys per call, oldest first, while reads keep seeing every value; a second
    flush sets nothing aside."""
    table = _Table({"a": {"x": 1.0}, "gone": {"y": 1.0}})
    view = WriteBehind(table, table)
    for n in range(3):
        view["a"] = {"x": 2.0 + n}
    view["new"] = {"z": 1.0}
    del view["gone"]
    view["brief"] = {"w": 1.0}
    view.pop("brief")
    assert view.get("a") == {"x": 4.0}
    assert "gone" not in view
    assert view.get("gone", "absent") == "absent"
    assert sorted(view) == ["a", "new"]
    assert len(view) == 2
    assert table.changelog == []
    assert view.pending == 4

    assert view.flush() == 4
    assert (view.pending, table.held) == (0, [view])
    assert table.changelog == []
    assert table.data == {"a": {"x": 1.0}, "gone": {"y": 1.0}}  # untouched until written
    assert (view.get("a"), sorted(view)) == ({"x": 4.0}, ["a", "new"])

    assert view.write_aside(3) is False  # three of the four
    assert table.changelog == [("a", {"x": 4.0}), ("new", {"z": 1.0}), ("gone", None)]
    assert table.data == {"a": {"x": 4.0}, "new": {"z": 1.0}}
    assert view.get("brief", "absent") == "absent"  # its delete is still set aside
    assert view.write_aside(3) is True
    assert table.changelog[3:] == [("brief", None)]
    assert table.data == {"a": {"x": 4.0}, "new": {"z": 1.0}}
    assert view.flush() == 0
    assert view.write_aside(3) is True
    assert len(table.changelog) == 4
    with pytest.raises(KeyError):
        view["gone"]


def test_write_behind_writes_layers_set_aside_in_order_and_reads_the_newest() -> None:
    """Two flushes before a write (a commit that sent nothing) set two layers aside: reads give
    the newest value of each key (held, then the newer layer, then the older one, then the
    table), and the write goes oldest layer first, so a key in both ends with its newer value
    in the table and two changelog records in order."""
    table = _Table({"u0": {"v": 0}})
    view = WriteBehind(table, table)
    view["u0"], view["u1"] = {"v": 1}, {"v": 1}
    view.flush()
    view["u0"] = {"v": 2}
    view.flush()
    view["u1"] = {"v": 3}
    assert (view.get("u0"), view.get("u1")) == ({"v": 2}, {"v": 3})
    assert view.write_aside(100) is True
    assert table.changelog == [("u0", {"v": 1}), ("u1", {"v": 1}), ("u0", {"v": 2})]
    assert table.data == {"u0": {"v": 2}, "u1": {"v": 1}}
    assert view.get("u1") == {"v": 3}  # still held


def test_write_behind_drops_the_held_writes_of_the_partitions_given_up() -> None:
    """When a rebalance takes changelog partitions 1 and 3 away, the writes held for their keys
    are forgotten, held or set aside and not yet written: reads give the last written value
    again, and only the keys of the partitions kept are written. An empty set drops nothing."""
    table = _Table({f"u{n}": {"v": 0} for n in range(8)})
    view = WriteBehind(table, table)
    for n in range(8):
        view[f"u{n}"] = {"v": n + 1}
    assert view.drop(set()) == 0
    assert view.drop({1, 3}) == 4
    assert (view.get("u1"), view.get("u2")) == ({"v": 0}, {"v": 3})
    assert view.pending == 4
    assert view.flush() == 4
    assert view.write_aside(100) is True
    assert [key for key, _ in table.changelog] == ["u0", "u2", "u4", "u6"]

    for n in range(8):  # now set aside and half written when the rebalance comes
        view[f"u{n}"] = {"v": 10 + n}
    view.flush()
    assert view.write_aside(4) is False  # u0 to u3
    assert view.drop({1, 3}) == 2  # u5 and u7; u1 and u3 are written already
    assert (view.get("u5"), view.get("u6")) == ({"v": 0}, {"v": 16})
    assert view.write_aside(100) is True
    assert [key for key, _ in table.changelog[4:]] == ["u0", "u1", "u2", "u3", "u4", "u6"]


def test_write_behind_encodes_held_objects_on_their_way_to_the_table() -> None:
    """The user-state table holds UserState objects between commits: reads give the held
    object, also once it is set aside, the write puts its record in the store and the
    changelog alike, and once written a read gives the record back."""
    table = _Table({})
    view = WriteBehind(table, table, UserState.to_dict)
    state = UserState(events=3, last_ts=7, last_event_id="e3")
    view["u1"] = state
    assert view.get("u1") is state
    assert view.flush() == 1
    assert view.get("u1") is state
    assert view.write_aside(10) is True
    assert table.changelog == [("u1", state.to_dict())]
    assert table.data == {"u1": {"i": [], "k": "", "t": [], "n": 3, "l": 7, "e": "e3"}}
    assert UserState.from_dict(view["u1"]) == state


def test_changelog_record_bytes_are_the_bytes_the_store_keeps(tmp_path: Path) -> None:
    """A write puts its changelog record's key and value bytes into the RocksDB store as they
    are, so they must be the bytes the store would encode itself, for each table of the worker
    (string keys, JSON values): a user state, co-visitation counts and a tombstone."""
    settings = Settings(data_dir=tmp_path)
    app = create_app(settings, "all")
    tables = user_tables(app)
    state = UserState(events=3, last_ts=7, last_event_id="e3")
    for view, key, value in (
        (tables.users, "u1", state.to_dict()),
        (tables.covisit, "i1", {"i2": 2.0, "i9": 1.0}),
    ):
        assert isinstance(view, WriteBehind)
        table = view.table
        store = table.data
        assert isinstance(store, KeyedRocksStore)
        raw_key, _ = table.changelog_topic.prepare_key(key, table.key_serializer)
        raw_value, _ = table.changelog_topic.prepare_value(value, table.value_serializer)
        assert raw_key == store._encode_key(key)
        assert raw_value == store._encode_value(value)
        store.put_encoded(raw_key, raw_value)
        assert store[key] == value
        store.put_encoded(raw_key, None)
        assert key not in store


@pytest.mark.stack
def test_changelog_batches_put_each_record_where_faust_would(
    settings: Settings, tmp_path: Path
) -> None:
    """The write-behind tables' changelog records, sent as record batches at each commit, are
    each on the partition Kafka's default partitioner gives their key (where Faust puts a
    table key, and where the key's new owner reads it after a rebalance); the newest record of
    each user holds all of that user's events, and of each co-visited item its counts, as the
    events imply (one record per key per commit, never one per event)."""
    items = catalogue(12)
    stack = Stack(settings, tmp_path / "run")
    try:
        stack.publish(*items)
        stack.wait_committed("recstream.encode-requests.v1", len(items))
        events = [
            {"type": "view", "user_id": f"u{n % 6}", "item_id": f"i{n % 12}", "event_id": f"e{n}"}
            for n in range(60)
        ]
        stack.publish(*events)
        stack.wait_committed(BEHAVIOR.name, len(events))
        stack.wait_for(lambda b: b.get("trigger_event_id") == "e59", "the last event's list")
    finally:
        stack.stop()
    partitions = settings.kafka.partitions
    latest: dict[str, dict[str, object]] = {"user-state": {}, "covisit": {}}
    records = 0
    for table, rows in latest.items():
        spec = TopicSpec(f"recstream-{table}-changelog", "key", "compact", True, "read back")
        for msg in read_topic(settings, spec, timeout_s=2.0):
            key = msg.key() or b""
            assert msg.partition() == partition_of(key, partitions), (table, key)
            rows[json.loads(key)] = json.loads(msg.value() or b"null")
            records += 1
    users = {u: UserState.from_dict(v) for u, v in latest["user-state"].items()}  # type: ignore[arg-type]
    assert {u: s.events for u, s in users.items()} == {f"u{k}": 10 for k in range(6)}
    assert records < 2 * len(events)  # held writes: far fewer records than table writes
    # u0 views i0, i6, i0, i6, ...: each of its views after the first co-visits the other item
    assert latest["covisit"]["i6"]["i0"] >= 1  # type: ignore[index]
