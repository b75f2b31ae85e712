"""Faults on purpose: malformed input, a worker killed or stopped mid-stream, a log replayed twice.

The stack tests run the real worker (role ``all``) against the embedded broker and compare what it
kept, read back from the tables' changelog topics, with the same events folded here by the same
pure functions, so "nothing lost, nothing counted twice" is checked value by value.
"""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import signal
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from confluent_kafka import Producer

from consumers.consumer import RecommendationConsumer, read_topic
from infra.broker import EmbeddedBroker
from infra.kafka import group_progress, producer_config, provision_topics
from infra.settings import Settings, load_settings
from infra.vectors import open_vector_store
from models.covisit import add_counts, bump_popularity
from models.state import (
    SEEN_BLOCK,
    Seen,
    UserState,
    apply_interaction,
    apply_review,
    event_hash,
    review_key,
)
from producers.replay import replay
from schemas.eventlog import rows_to_frame, to_row
from schemas.events import MAX_TEXT_CHARS, BehaviorEvent, ItemEvent, ReviewEvent, now_ms
from schemas.internal import UserUpdate
from schemas.serde import MAX_EVENT_BYTES
from schemas.topics import (
    BEHAVIOR,
    CATALOG,
    ENCODE_REQUESTS,
    RECOMMENDATIONS,
    USER_UPDATES,
    TopicSpec,
)
from streams.ingest import route
from streams.user_state import POPULAR_KEY, apply_updates
from tests.conftest import Stack, catalogue

TS = 1_700_000_000_000
GROUP = Stack.GROUP
PROBE = {"type": "view", "event_id": "probe", "ts": TS, "user_id": "probe", "item_id": "i0"}


# -- de-duplication, without Kafka -------------------------------------------------------------


def _view(event_id: str, user: str, item: str, ts: int) -> UserUpdate:
    return UserUpdate(
        event_id=event_id,
        ts=ts,
        received_ms=ts,
        kind="behavior",
        user_id=user,
        event_type="view",
        item_id=item,
    )


def test_seen_recognises_recent_ids_and_events_older_than_its_horizon() -> None:
    """The latest 32-64 event ids are recognised; once a block is dropped, events older than the
    newest time it held count as seen, while a new event at or after that time does not."""
    seen = Seen()
    for n in range(2 * SEEN_BLOCK + 16):
        assert (f"e{n}", TS + n) not in seen
        seen.add(f"e{n}", TS + n)
    assert ("e79", TS + 79) in seen
    assert ("e64", TS + 64) in seen
    assert ("e40", TS + 40) in seen  # the previous block
    assert seen.horizon == TS + SEEN_BLOCK - 1  # the first block's newest time
    assert ("e3", TS + 3) in seen  # dropped, but older than the horizon
    assert ("fresh", TS + SEEN_BLOCK - 1) not in seen
    assert len(seen.current) == 16 * 5
    assert len(seen.previous) == SEEN_BLOCK * 5


def test_seen_round_trips_through_the_table_record() -> None:
    """The record holds the fingerprints and horizon, and a state read back recognises the same
    events; the fingerprint is five URL-safe characters."""
    state = UserState()
    for n in range(40):
        state.seen.add(f"e{n}", TS + n)
    back = UserState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert back.seen == state.seen
    assert ("e39", TS + 39) in back.seen
    assert len(event_hash("any-id")) == 5
    assert event_hash("any-id").replace("-", "").replace("_", "").isalnum()


def test_seen_matches_whole_fingerprints_only() -> None:
    """A fingerprint is recognised where it sits at a fingerprint boundary of either block; the
    same characters straddling two fingerprints are not a match."""
    mark = event_hash("e-probe")
    assert ("e-probe", TS) in Seen(current="xxxxx" + mark)
    assert ("e-probe", TS) in Seen(previous=mark + "yyyyy")
    assert ("e-probe", TS) not in Seen(current="xx" + mark + "yyy")
    assert ("e-probe", TS) not in Seen(current="xx" + mark + "yyy" + mark[:4], previous="z" + mark)
    assert ("e-probe", TS) in Seen(current="xx" + mark + "yyy" + mark)  # the second is whole


def test_a_copied_state_changes_without_changing_the_original() -> None:
    """The next batch changes a copy of a user's state while the state it was copied from may
    still be ranked: repeating the latest item, consuming, reviewing and remembering event ids
    leave the original exactly as it was."""
    state = UserState()
    for n, item in enumerate(["a", "b"]):
        apply_interaction(state, item, "view", TS + n, None, max_recent=5)
        state.seen.add(f"e{n}", state.last_ts)
    before = state.to_dict()
    copy = state.copy()
    apply_interaction(copy, "b", "purchase", TS + 9, None, max_recent=5)  # replaces the latest
    apply_review(copy, "review:r1", "b", "great")
    copy.seen.add("e9", copy.last_ts)
    assert state.to_dict() == before
    assert state.recent[-1].kind == "view"
    assert (copy.recent[-1].kind, copy.recent[-1].ts, copy.consumed) == ("purchase", TS + 9, ["b"])
    assert ("e9", TS + 9) in copy.seen
    assert ("e9", TS + 9) not in state.seen


def test_repeated_updates_change_nothing_and_make_no_list() -> None:
    """Applying a user's updates, then the same updates again (a redelivery), leaves the state
    exactly as it was and reports them as repeats; a new event among repeats is applied once."""
    ups = [_view(f"e{n}", "u", f"i{n % 4}", TS + n) for n in range(6)]
    first = apply_updates(UserState(), ups, max_recent=50)
    record = first.state.to_dict()
    again = apply_updates(UserState.from_dict(record), ups, max_recent=50)
    assert (again.changed, again.repeats, again.pairs, again.touched) == (False, 6, [], [])
    assert again.state.to_dict() == record
    mixed = apply_updates(
        UserState.from_dict(record), [*ups[-2:], _view("new", "u", "i9", TS + 9)], 50
    )
    assert (mixed.changed, mixed.repeats, mixed.touched) == (True, 2, ["i9"])
    assert mixed.state.events == 7


# -- the embedded stack ------------------------------------------------------------------------


def _behaviour(count: int, users: int, items: int, prefix: str) -> list[dict[str, Any]]:
    kinds = ["view", "click", "view", "add_to_cart", "purchase"]
    return [
        {
            "type": kinds[n % len(kinds)],
            "event_id": f"{prefix}-{n}",
            "ts": TS + 1000 * n,
            "user_id": f"{prefix}-u{n % users}",
            "item_id": f"i{(n * 7 + n // users) % items}",
        }
        for n in range(count)
    ]


def _read_topic(
    settings: Settings, topic: str, before: int | None = None
) -> list[tuple[bytes, bytes | None]]:
    """Every message's key and value on ``topic``, read until it has been quiet for two seconds.

    Not up to the high watermark: the embedded broker reports it as one past the *first* offset
    of a partition's last record batch, so reading to it would stop short. With ``before``, only
    messages at lower offsets (of a one-partition topic) are kept.
    """
    spec = TopicSpec(topic, "key", "delete", True, "read back by a test")
    return [
        (msg.key() or b"", msg.value())
        for msg in read_topic(settings, spec, timeout_s=2.0)
        if before is None or (msg.offset() or 0) < before
    ]


def _read_table(settings: Settings, table: str) -> dict[str, Any]:
    """The latest value of every key in a table's changelog topic (deleted keys left out)."""
    latest: dict[str, Any] = {}
    for key, value in _read_topic(settings, f"{GROUP}-{table}-changelog"):
        if value is None:
            latest.pop(json.loads(key), None)
        else:
            latest[json.loads(key)] = json.loads(value)
    return latest


def _events(users: dict[str, Any]) -> int:
    return sum(UserState.from_dict(u).events for u in users.values())


def _table_when(
    settings: Settings, table: str, done: Any, timeout_s: float = 60.0
) -> dict[str, Any]:
    """The table once ``done(table)`` holds (its last sends may still be on their way), or as it
    is when ``timeout_s`` runs out, for the caller's assertion to show."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = _read_table(settings, table)
        if done(rows) or time.monotonic() > deadline:
            return rows


def _expected_tables(events: list[dict[str, Any]]) -> tuple[dict, dict, dict]:
    """Users, co-visitation and popularity as the worker should hold them after ``events`` (in
    publish order), folded by the functions the worker runs, each event once."""
    by_user: dict[str, list[UserUpdate]] = defaultdict(list)
    for raw in events:
        for out in route(BehaviorEvent.model_validate(raw), raw["ts"]):
            update = UserUpdate.model_validate_json(out.value)
            by_user[update.user_id].append(update)
    users, neighbours = {}, defaultdict(list)
    for user, ups in by_user.items():
        applied = apply_updates(UserState(), ups, max_recent=50)
        users[user] = applied.state.to_dict()
        for a, b in applied.pairs:
            neighbours[a].append(b)
    covisit = {item: add_counts(None, others) for item, others in neighbours.items()}
    return users, covisit, bump_popularity(None, [raw["item_id"] for raw in events])


def _wait_settled(stack: Stack, behaviour_total: int, timeout_s: float = 180.0) -> None:
    """Until the worker has committed every behaviour event and every user update it made."""
    stack.wait_committed(BEHAVIOR.name, behaviour_total, timeout_s)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, end = group_progress(stack.settings.kafka, GROUP, USER_UPDATES.name)
        if done >= end:
            return
        stack.assert_alive()
        time.sleep(0.5)
    raise AssertionError(f"user updates not all committed; log:\n{stack.log()}")


def _assert_tables_match(settings: Settings, events: list[dict[str, Any]]) -> None:
    """The user states equal a fold of ``events`` exactly. The counts (co-visitation and
    popularity) may count a batch that was in flight at a stop twice (they are written before the
    user states, so never lose it): no count may be missing, and the extra stays within a
    tenth."""
    users, covisit, popular = _expected_tables(events)
    assert _table_when(settings, "user-state", lambda rows: rows == users) == users
    stored_covisit = _read_table(settings, "covisit")
    stored_popular = _read_table(settings, "popularity")[POPULAR_KEY]
    assert stored_covisit.keys() == covisit.keys()
    assert stored_popular.keys() == popular.keys()
    for item, neighbours in covisit.items():
        assert all(stored_covisit[item].get(n, 0) >= c for n, c in neighbours.items())
    extra = sum(map(sum, (v.values() for v in stored_covisit.values()))) - sum(
        map(sum, (v.values() for v in covisit.values()))
    )
    assert extra <= 0.1 * sum(map(sum, (v.values() for v in covisit.values())))
    assert all(math.isclose(stored_popular[k], popular[k], rel_tol=0.1) for k in popular)


def _start(settings: Settings, workdir: Path, items: int, **env: str) -> Stack:
    """A worker with the catalogue embedded: waits for a probe user's first list."""
    stack = Stack(settings, workdir, **env)
    stack.publish(*catalogue(items))
    deadline = time.monotonic() + 180
    while group_progress(settings.kafka, GROUP, ENCODE_REQUESTS.name)[0] < items:
        stack.assert_alive()
        assert time.monotonic() < deadline, stack.log()
        time.sleep(0.5)
    stack.publish(PROBE)
    stack.wait_for(lambda b: b.get("user_id") == "probe", "the probe user's list", 180)
    return stack


def _malformed() -> list[tuple[str, bytes | None, str]]:
    """(what, message value, expected error type) for every kind of bad input."""
    good = {"type": "view", "user_id": "bad-u", "item_id": "i1", "ts": TS}

    def js(**changes: Any) -> bytes:
        return json.dumps({**good, **changes}).encode()

    missing = dict(good)
    del missing["item_id"]
    untyped = dict(good)
    del untyped["type"]
    review = {"type": "review", "user_id": "bad-u", "item_id": "i1", "ts": TS}
    return [
        ("bad JSON", b'{"type": "view", "user_id": ', "bad_json"),
        ("not UTF-8", b'{"type": "view", "user_id": "\xff\xfe"}', "not_utf8"),
        ("not an object", b"[1, 2, 3]", "not_object"),
        ("tombstone", None, "empty"),
        ("missing field", json.dumps(missing).encode(), "invalid_field"),
        ("missing type", json.dumps(untyped).encode(), "missing_type"),
        ("wrong types", js(user_id=123, item_id=["i1"]), "invalid_field"),
        ("unknown type", js(type="wishlist"), "unknown_type"),
        ("wrong schema version", js(schema_version=2), "wrong_version"),
        ("empty id", js(user_id=""), "invalid_field"),
        ("blank id", js(item_id="   "), "invalid_field"),
        ("far-future ts", js(ts=now_ms() + 30 * 86_400_000), "invalid_field"),
        ("ts in seconds", js(ts=1_700_000_000), "invalid_field"),
        ("rating without value", js(type="rating"), "invalid_field"),
        (
            "oversize review text",
            json.dumps({**review, "text": "x" * (MAX_TEXT_CHARS + 1)}).encode(),
            "invalid_field",
        ),
        (
            "oversize event",
            json.dumps({**review, "text": "y" * MAX_EVENT_BYTES}).encode(),
            "too_large",
        ),
        ("catalogue event on the behaviour topic", js(type="item", title="t"), "wrong_topic"),
    ]


@pytest.mark.stack
def test_every_event_is_processed_or_dead_lettered_exactly(
    settings: Settings, tmp_path: Path
) -> None:
    """N events in, a known share malformed in every way the contract names: each malformed one
    is on the dead-letter topic once, with its reason and original bytes; each valid one is in
    its user's state once; processed + dead-lettered == N."""
    stack = _start(settings, tmp_path, items=12)
    try:
        valid = _behaviour(150, users=15, items=12, prefix="ok")
        bad = _malformed() * 3
        sent: list[tuple[str, bytes | None, str]] = []
        for n, event in enumerate(valid):
            sent.append(("valid", json.dumps(event).encode(), ""))
            if n % 3 == 0 and bad:
                sent.append(bad.pop())
        sent.extend(bad)
        for _, value, _ in sent:
            stack.producer.produce(BEHAVIOR.name, key=b"bad-u", value=value)
        stack.producer.flush(30)
        total = len(sent) + 1  # and the probe
        _wait_settled(stack, total)
        malformed = [s for s in sent if s[0] != "valid"]
        deadline = time.monotonic() + 30
        while len(stack.dead_letters) < len(malformed) and time.monotonic() < deadline:
            stack._drain(0.5)
        letters = stack.dead_letters
        assert sorted((d["error_type"], base64.b64decode(d["payload_b64"])) for d in letters) == (
            sorted((kind, value or b"") for _, value, kind in malformed)
        )
        assert all(d["stage"] == "validate-input" and d["error"] for d in letters)
        users = _table_when(settings, "user-state", lambda rows: _events(rows) >= len(valid) + 1)
        processed = _events(users)
        assert processed == len(valid) + 1
        assert processed + len(letters) == total
        assert "bad-u" not in users
    finally:
        stack.stop()


def _publish_paced(settings: Settings, events: list[dict[str, Any]], rate: float) -> None:
    """Send ``events`` to the behaviour topic at ``rate`` per second (a steady stream)."""
    producer = Producer(producer_config(settings.kafka))
    start = time.monotonic()
    for n, event in enumerate(events):
        delay = start + n / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        producer.produce(
            BEHAVIOR.name, key=event["user_id"].encode(), value=json.dumps(event).encode()
        )
        producer.poll(0)
    assert producer.flush(30) == 0


def _stream_in(
    stack: Stack, events: list[dict[str, Any]], rate: float, topic: str, committed: int
) -> threading.Thread:
    """Start publishing ``events`` at ``rate`` per second; return once the worker's group has
    committed ``committed`` messages of ``topic`` (the publisher thread still running)."""
    publisher = threading.Thread(target=_publish_paced, args=(stack.settings, events, rate))
    publisher.start()
    deadline = time.monotonic() + 120
    while group_progress(stack.settings.kafka, GROUP, topic)[0] < committed:
        stack.assert_alive()
        assert time.monotonic() < deadline, stack.log()
        time.sleep(0.05)
    return publisher


def _forwarded(settings: Settings, before: int | None = None) -> set[str]:
    """Event ids of the behaviour updates the ingest hop wrote to the user-update topic (those
    at offsets below ``before``, if given)."""
    ids = set()
    for _, value in _read_topic(settings, USER_UPDATES.name, before):
        for line in (value or b"{}").split(b"\n"):  # a message carries updates, one per line
            body = json.loads(line)
            if body.get("kind") == "behavior":
                ids.add(body["event_id"])
    return ids


def _recommendation_pairs(settings: Settings) -> tuple[Counter, int]:
    """(user, trigger) pairs on the recommendation topic, and how many RecommendationConsumer
    passes on (it drops repeats of a pair)."""
    pairs: Counter = Counter()
    for _, value in _read_topic(settings, RECOMMENDATIONS.name):
        body = json.loads(value or b"{}")
        pairs[(body["user_id"], body["trigger_event_id"])] += 1
    with RecommendationConsumer(settings) as consumer:
        passed = consumer.take(sum(pairs.values()), timeout_s=10)
    assert consumer.duplicates == sum(pairs.values()) - len(pairs)
    return pairs, len(passed)


#: How the worker (role ``all``) gets a user's behaviour to its user state: applied by its ingest
#: agent itself (one hop, the default), or through the user-updates topic (two hops, as between
#: workers of split roles).
HOPS = {"one hop": {}, "two hops": {"RECSTREAM_STREAM__DIRECT_UPDATES": "false"}}


def _reached(settings: Settings, hops: str, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Of ``events``, those the user-state step has been given. Through the user-updates topic:
    those forwarded on it. In one hop: all of them, and the topic carries no behaviour update."""
    forwarded = _forwarded(settings)
    if hops == "one hop":
        assert forwarded == set(), "a behaviour update went through the user-updates topic"
        return events
    return [e for e in events if e["event_id"] in forwarded]


@pytest.mark.stack
@pytest.mark.parametrize("hops", HOPS)
def test_worker_killed_mid_stream_recovers_every_event_exactly_once(
    settings: Settings, tmp_path: Path, hops: str
) -> None:
    """kill -9 while events stream in, then restart: the tables recover from their changelogs;
    every event that reached the user-state step is in its user's state exactly once
    (redelivered ones are recognised by event id) and none failed to reach it; no co-visitation
    count is lost; lists resume; and every repeated list carries its trigger id so
    RecommendationConsumer drops it. In one hop and in two."""
    first = _start(settings, tmp_path / "run1", items=60, **HOPS[hops])
    events = _behaviour(900, users=30, items=20, prefix="k")  # 40 items stay recommendable
    progress = USER_UPDATES.name if hops == "two hops" else BEHAVIOR.name
    publisher = _stream_in(first, events, 150.0, progress, 200)
    try:
        first.proc.kill()  # SIGKILL: no shutdown, no final commit
        first.proc.wait(10)
        first.reader.close()
        killed_at = group_progress(settings.kafka, GROUP, BEHAVIOR.name)[0]
        assert killed_at < len(events), "the worker finished before it was killed"
        second = Stack(settings, tmp_path / "run2", **HOPS[hops])
        try:
            publisher.join(60)
            _wait_settled(second, len(events) + 1)
            reached = _reached(settings, hops, [PROBE, *events])
            lost = len(events) + 1 - len(reached)
            assert lost == 0, f"{lost} events never reached the user-state step"
            _assert_tables_match(settings, reached)
            late = {e["event_id"] for e in events[-100:]}
            second.wait_for(lambda b: b.get("trigger_event_id") in late, "a list after restart")
        finally:
            second.stop()
        pairs, passed = _recommendation_pairs(settings)
        assert passed == len(pairs)
    finally:
        publisher.join(60)
        if first.proc.poll() is None:
            first.stop()


@pytest.mark.stack
@pytest.mark.parametrize("hops", HOPS)
def test_sigterm_stops_cleanly_and_nothing_is_applied_or_listed_twice(
    settings: Settings, tmp_path: Path, hops: str
) -> None:
    """SIGTERM while events stream in: the worker exits cleanly (code 0); on each hop what it
    committed is exactly what it forwarded or applied; after the next start every event that
    reaches the user-state step and is applied once, and no (user, trigger) list is emitted
    twice. In one hop and in two."""
    first = _start(settings, tmp_path / "run1", items=12, **HOPS[hops])
    burst = _behaviour(600, users=30, items=12, prefix="t")
    progress = USER_UPDATES.name if hops == "two hops" else BEHAVIOR.name
    publisher = _stream_in(first, burst, 150.0, progress, 100)
    try:
        first.proc.terminate()
        assert first.proc.wait(60) == 0, first.log()
        first.reader.close()
        done, _ = group_progress(settings.kafka, GROUP, BEHAVIOR.name)
        assert 100 <= done < 1 + len(burst), "the stop did not land mid-stream"
        applied = _events(_read_table(settings, "user-state"))
        if hops == "one hop":
            assert applied == done  # the ingest agent committed what it applied
        else:
            assert len(_forwarded(settings)) == done  # the ingest hop committed what it forwarded
            consumed, _ = group_progress(settings.kafka, GROUP, USER_UPDATES.name)
            assert applied == len(_forwarded(settings, before=consumed))  # committed == applied
    finally:
        publisher.join(60)
    second = Stack(settings, tmp_path / "run2", **HOPS[hops])
    try:
        more = _behaviour(60, users=30, items=12, prefix="t2")
        second.publish(*more)
        _wait_settled(second, 1 + len(burst) + len(more))
        reached = _reached(settings, hops, [PROBE, *burst, *more])
        assert len(reached) == len(burst) + len(more) + 1, "events never reached the user-state"
        _assert_tables_match(settings, reached)
    finally:
        second.stop()
    pairs, _ = _recommendation_pairs(settings)
    assert max(pairs.values()) == 1


def _differences(got: dict[str, Any], want: dict[str, Any]) -> str:
    """Each user whose stored state differs from the expected one, field by field."""
    lines = []
    for user in sorted(got.keys() | want.keys()):
        a, b = got.get(user), want.get(user)
        if a == b:
            continue
        if a is None or b is None:
            lines.append(f"{user}: stored {a is not None}, expected {b is not None}")
            continue
        for field in sorted(a.keys() | b.keys()):
            if a.get(field) != b.get(field):
                lines.append(f"{user}.{field}: stored {a.get(field)!r} expected {b.get(field)!r}")
    return "\n".join(lines)


def _wait_logged(stack: Stack, text: str, after: int, timeout_s: float = 120.0) -> None:
    """Until ``text`` appears in the worker's log after its first ``after`` occurrences."""
    deadline = time.monotonic() + timeout_s
    while stack.log_path.read_text(errors="replace").count(text) <= after:
        stack.assert_alive()
        assert time.monotonic() < deadline, f"no {text!r}; log:\n{stack.log()}"
        time.sleep(0.2)


@pytest.mark.stack
def test_two_workers_of_role_all_hand_users_over_and_keep_each_users_order(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """Two workers of role ``all`` on four partitions: each applies the updates of the users
    whose partition it holds itself and sends the others' through the user-updates topic. A
    second worker joins while events stream in, and the first stops (SIGTERM) while they still
    do, so two rebalances move users between the two paths. Each worker applies nothing itself
    after an assignment until its barriers are back; every user's state then equals the fold
    of their events in order, each once, and both paths carried events. (Co-visitation and
    popularity are counted per worker with several workers, a documented limit, so they are
    not compared here.)"""
    settings = load_settings(
        data_dir=tmp_path / "seed",
        kafka={"bootstrap_servers": broker.bootstrap_servers, "partitions": 4},
    )
    provision_topics(settings.kafka)
    seed = Stack(settings, tmp_path / "seed")  # the catalogue's vectors, copied for each worker
    try:
        seed.publish(*catalogue(40))
        seed.wait_committed(ENCODE_REQUESTS.name, 40, 180)
    finally:
        seed.stop()
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        shutil.copytree(
            settings.vectors_dir, d / settings.vectors_dir.relative_to(settings.data_dir)
        )
    events = _behaviour(1200, users=40, items=20, prefix="h")  # 20 items stay recommendable
    ready = "local_updates_ready"
    first = Stack(settings, tmp_path / "a", RECSTREAM_DATA_DIR=str(dirs[0]))
    second = None
    try:
        _wait_logged(first, ready, 0, 180)
        publisher = threading.Thread(target=_publish_paced, args=(settings, events[:900], 60.0))
        publisher.start()
        first.wait_committed(BEHAVIOR.name, 200)
        second = Stack(settings, tmp_path / "b", RECSTREAM_DATA_DIR=str(dirs[1]))
        _wait_logged(second, ready, 0, 180)  # the rebalance is done; events still stream in
        publisher.join(60)
        first.wait_committed(BEHAVIOR.name, 900)
        publisher = threading.Thread(target=_publish_paced, args=(settings, events[900:], 60.0))
        publisher.start()
        first.wait_committed(BEHAVIOR.name, 1000)
        first.proc.terminate()
        assert first.proc.wait(60) == 0, first.log()
        _wait_logged(second, ready, 1, 180)  # second holds all four partitions now
        publisher.join(60)
        _wait_settled(second, len(events))
        forwarded = _forwarded(settings)
        assert 0 < len(forwarded) < len(events), "one of the two paths carried nothing"
        users = _expected_tables(events)[0]
        stored = _table_when(settings, "user-state", lambda rows: rows == users)
        assert stored == users, _differences(stored, users)
    finally:
        first.stop()
        if second is not None:
            second.stop()


@pytest.mark.stack
def test_sigterm_while_ranking_is_deferred_sends_every_waiting_user_their_list(
    settings: Settings, tmp_path: Path
) -> None:
    """A burst puts the recommend agent behind, and with a 10-minute deferral its users wait for
    their lists; a SIGTERM in the middle of the burst still ranks them before the worker exits
    (code 0, nothing left undrained), so every user's last list names the newest event in
    their state."""
    stack = Stack(settings, tmp_path, RECSTREAM_STREAM__RANK_MAX_DELAY_MS="600000")
    try:
        stack.publish(*catalogue(60))
        deadline = time.monotonic() + 180
        while group_progress(settings.kafka, GROUP, ENCODE_REQUESTS.name)[0] < 60:
            stack.assert_alive()
            assert time.monotonic() < deadline, stack.log()
            time.sleep(0.5)
        stack.publish(PROBE)
        stack.wait_for(lambda b: b.get("user_id") == "probe", "the probe user's list", 180)
        deadline = time.monotonic() + 60
        while (progress := group_progress(settings.kafka, GROUP, BEHAVIOR.name))[0] < (
            before := progress[1]
        ):
            assert time.monotonic() < deadline, stack.log()
            time.sleep(0.2)
        # long enough that the agent is still behind on it at the SIGTERM below
        burst = _behaviour(60000, users=30, items=20, prefix="d")  # 40 items stay recommendable
        for event in burst:
            stack.producer.produce(
                BEHAVIOR.name, key=event["user_id"].encode(), value=json.dumps(event).encode()
            )
            stack.producer.poll(0)
        assert stack.producer.flush(30) == 0
        deadline = time.monotonic() + 120
        # some of the burst absorbed
        while group_progress(settings.kafka, GROUP, BEHAVIOR.name)[0] <= before:
            stack.assert_alive()
            assert time.monotonic() < deadline, stack.log()
            time.sleep(0.05)
        stack.proc.terminate()
        assert stack.proc.wait(60) == 0, stack.log()
        # Users still waiting are ranked as the agent's input stops (it has taken no batch for
        # 0.1 s) or, failing that, by the drain on the stop; none is left behind.
        assert "backlog_not_drained" not in stack.log()
        taken, sent = group_progress(settings.kafka, GROUP, BEHAVIOR.name)
        assert taken < sent, "the worker had taken the whole burst before it was stopped"
    finally:
        stack.stop()
    newest = {
        u: UserState.from_dict(v).last_event_id
        for u, v in _read_table(settings, "user-state").items()
    }
    last_list: dict[str, str] = {}
    for _, value in _read_topic(settings, RECOMMENDATIONS.name):
        body = json.loads(value or b"{}")
        last_list[body["user_id"]] = body["trigger_event_id"]
    assert len(newest) == 31  # the probe and the burst's 30 users
    assert last_list == newest


#: How long the broker stops answering in the partition test: longer than the worker's
#: session timeout would let a group rebalance, shorter than the producers' delivery timeout.
PAUSE_S = 15.0


@pytest.mark.stack
def test_broker_unreachable_mid_stream_then_back_loses_nothing(
    broker: EmbeddedBroker, settings: Settings, tmp_path: Path
) -> None:
    """The broker stops answering for PAUSE_S seconds while events stream in (SIGSTOP: every
    connection hangs, as in a network partition) and then answers again (SIGCONT): the worker
    and the producer reconnect by themselves, and every event reaches the user-state step and is
    applied exactly once, with no dead letter."""
    stack = _start(settings, tmp_path / "run", items=12)
    events = _behaviour(450, users=20, items=12, prefix="p")
    publisher = _stream_in(stack, events, 60.0, BEHAVIOR.name, 150)
    try:
        assert broker.pid is not None
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            time.sleep(PAUSE_S)
            stack.assert_alive()
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        publisher.join(120)
        assert not publisher.is_alive(), "the publisher did not finish after the broker came back"
        _wait_settled(stack, len(events) + 1)
        reached = _reached(settings, "one hop", [PROBE, *events])  # the default
        assert len(reached) == len(events) + 1, "events never reached the user-state step"
        _assert_tables_match(settings, reached)
        stack._drain(2.0)
        assert stack.dead_letters == []
    finally:
        publisher.join(60)
        stack.stop()


def _replay_log(path: Path) -> tuple[Path, list[str], list[str]]:
    """A small event log (catalogue, behaviour, reviews) as Parquet; its item and review keys."""
    events: list[Any] = [ItemEvent.model_validate(raw) for raw in catalogue(30)]
    reviews = []
    for n, raw in enumerate(_behaviour(120, users=12, items=9, prefix="r")):
        events.append(BehaviorEvent.model_validate(raw))
        if n % 10 == 0:
            review = ReviewEvent(
                event_id=f"rev-{n}",
                ts=raw["ts"] + 1,
                type="review",
                user_id=raw["user_id"],
                item_id=raw["item_id"],
                text=f"Review {n}: sturdy and precise, would use again for {raw['item_id']}.",
                rating=4.0,
            )
            events.append(review)
            reviews.append(review_key(review.event_id))
    rows_to_frame([to_row(e) for e in events]).write_parquet(path)
    return path, [f"i{n}" for n in range(30)], reviews


def _vectors(settings: Settings, items: list[str], reviews: list[str]) -> dict[str, Any]:
    """Every stored vector (rounded) and payload of the given keys, read from the worker's store
    after it stopped (an Edge store belongs to one process at a time)."""
    store = open_vector_store(settings)
    try:
        out = {}
        for collection, keys in (
            (settings.vectors.items_collection, items),
            (settings.vectors.reviews_collection, reviews),
        ):
            for key, point in store.retrieve(collection, keys).items():
                assert point.vector is not None
                out[f"{collection}/{key}"] = (np.round(point.vector, 6).tolist(), point.payload)
        return out
    finally:
        store.close()


def _settle_replay(stack: Stack, behaviour: int, catalogue: int) -> None:
    stack.wait_committed(CATALOG.name, catalogue)
    _wait_settled(stack, behaviour)
    deadline = time.monotonic() + 120
    while True:  # encode requests, then the user updates they make
        done, end = group_progress(stack.settings.kafka, GROUP, ENCODE_REQUESTS.name)
        later, last = group_progress(stack.settings.kafka, GROUP, USER_UPDATES.name)
        if done >= end and later >= last:
            return
        assert time.monotonic() < deadline, stack.log()
        time.sleep(0.5)


@pytest.mark.stack
def test_replaying_the_same_log_twice_leaves_state_and_vectors_identical(
    settings: Settings, tmp_path: Path
) -> None:
    """Replay a log (catalogue, behaviour, reviews), stop, replay it again after a restart: the
    user, co-visitation and popularity tables and every stored vector and payload are exactly as
    after the first replay, and the second replay makes no recommendation."""
    log_path, items, reviews = _replay_log(tmp_path / "log.parquet")
    catalogue, behaviour = 30, 120 + len(reviews)
    snapshots = []
    for run in (1, 2):
        stack = Stack(settings, tmp_path / f"run{run}")
        try:
            report = replay(settings, log_path, None, progress=False)
            assert report.sent == catalogue + behaviour
            _settle_replay(stack, run * behaviour, run * catalogue)
            tables = {t: _read_table(settings, t) for t in ("user-state", "covisit", "popularity")}
            lists = len(_read_topic(settings, RECOMMENDATIONS.name))
        finally:
            stack.stop()
        snapshots.append((tables, _vectors(settings, items, reviews), lists))
    (tables1, vectors1, lists1), (tables2, vectors2, lists2) = snapshots
    assert len(tables1["user-state"]) == 12
    assert sum(len(UserState.from_dict(u).reviews) for u in tables1["user-state"].values()) == 12
    assert len(vectors1) == len(items) + len(reviews)
    assert tables2 == tables1
    assert vectors2 == vectors1
    assert lists1 > 0
    assert lists2 == lists1
