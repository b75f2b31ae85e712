"""Consumers against the embedded broker: RecommendationConsumer, tail and archive."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import polars as pl
from confluent_kafka import Producer

from consumers.archive import archive
from consumers.consumer import RecommendationConsumer
from consumers.tail import tail
from infra.kafka import confluent_config
from infra.settings import Settings
from schemas.eventlog import from_row
from schemas.events import Event, RecommendationEvent, RecommendedItem
from schemas.serde import encode, validate_object
from schemas.topics import BEHAVIOR, CATALOG, FORGET, RECOMMENDATIONS, TopicSpec

TS = 1_700_000_000_000


def _produce(settings: Settings, messages: list[tuple[TopicSpec, str, bytes]]) -> None:
    """Produce raw (topic, key, value) messages with a plain confluent-kafka producer."""
    producer = Producer(confluent_config(settings.kafka))
    for spec, key, value in messages:
        producer.produce(spec.name, key=key.encode(), value=value)
    assert producer.flush(10) == 0


def _rec(user: str, trigger: str, *items: str) -> RecommendationEvent:
    return RecommendationEvent(
        user_id=user,
        trigger_event_id=trigger,
        model_version="test-1",
        latency_ms=12.5,
        items=[
            RecommendedItem(item_id=item, rank=rank, score=1.0 / rank, reasons=[f"like {item}"])
            for rank, item in enumerate(items, start=1)
        ],
    )


def _produce_recs(settings: Settings, recs: list[RecommendationEvent]) -> None:
    _produce(settings, [(RECOMMENDATIONS, rec.user_id, encode(rec)) for rec in recs])


def test_consumer_yields_filters_and_drops_repeats(settings: Settings) -> None:
    """Recommendations come back as records, filtered by user, with repeats and junk skipped."""
    first, other, third = (
        _rec("u1", "t1", "i1", "i2"),
        _rec("u2", "t2", "i3"),
        _rec("u1", "t3", "i4"),
    )
    repeat = first.model_copy(update={"event_id": "re-emitted"})  # same user and trigger
    _produce_recs(settings, [first, other])
    _produce(settings, [(RECOMMENDATIONS, "u1", b"not json")])
    _produce_recs(settings, [repeat, third])

    with RecommendationConsumer(settings) as everyone:
        assert everyone.take(10, timeout_s=1.5) == [first, other, third]
        assert (everyone.duplicates, everyone.undecodable) == (1, 1)
        assert everyone.group_id.startswith("recstream-tail-")

    with RecommendationConsumer(settings, user_id="u1") as one_user:
        assert one_user.take(2, timeout_s=10) == [first, third]
        assert one_user.poll(0.5) is None


def test_consumer_in_a_named_group_reads_from_the_beginning(settings: Settings) -> None:
    """With a group id the consumer joins that group and reads what was already produced."""
    recs = [_rec("u1", "t1", "i1"), _rec("u2", "t2", "i2")]
    _produce_recs(settings, recs)
    with RecommendationConsumer(settings, group_id="dashboard") as consumer:
        assert consumer.take(2, timeout_s=20) == recs


def test_tail_prints_json_lines_and_readable_blocks(settings: Settings) -> None:
    """tail --json prints one parseable event per line; the default prints ranked items."""
    recs = [_rec("u1", "t1", "i1", "i22"), _rec("u2", "t2", "i3")]
    _produce_recs(settings, recs)

    out = io.StringIO()
    assert tail(settings, max_n=5, timeout_s=0.5, as_json=True, out=out) == 2
    lines = out.getvalue().splitlines()
    assert [RecommendationEvent.model_validate(json.loads(line)) for line in lines] == recs

    out = io.StringIO()
    assert tail(settings, user="u1", max_n=1, timeout_s=5, out=out) == 1
    assert out.getvalue().splitlines() == [
        "user u1  trigger t1  latency 12.5 ms  model test-1",
        "  1. i1   1.000  — like i1",
        "  2. i22  0.500  — like i22",
        "",
    ]


def _input_events() -> list[Event]:
    objects = [
        {"type": "view", "user_id": "u1", "item_id": "i1", "ts": TS},
        {"type": "rating", "user_id": "u1", "item_id": "i1", "value": 4.5, "ts": TS + 1},
        {"type": "review", "user_id": "u2", "item_id": "i1", "text": "Clear.", "ts": TS + 2},
        {
            "type": "item",
            "item_id": "i1",
            "title": "Pipette",
            "categories": ["lab"],
            "attributes": {"ml": 10, "glass": True},
            "ts": TS + 3,
        },
        {"type": "item_removed", "item_id": "i2", "ts": TS + 4},
        {"type": "forget_user", "user_id": "u3", "ts": TS + 5},
        {"type": "purchase", "user_id": "u2", "item_id": "i1", "ts": TS + 6},
    ]
    return [validate_object(obj) for obj in objects]


def _produce_events(settings: Settings, events: list[Event]) -> None:
    specs = {"item": CATALOG, "item_removed": CATALOG, "forget_user": FORGET}
    messages = []
    for event in events:
        spec = specs.get(event.type, BEHAVIOR)
        messages.append((spec, str(getattr(event, spec.key)), encode(event)))
    _produce(settings, messages)


def _read_log(files: list[Path]) -> list[dict[str, object]]:
    return [row for path in files for row in pl.read_parquet(path).iter_rows(named=True)]


def test_archive_writes_parquet_that_round_trips(settings: Settings, tmp_path: Path) -> None:
    """Archived rows turn back into the produced events; a restart continues after the last file."""
    events = _input_events()
    _produce_events(settings, events[:6])
    _produce(settings, [(BEHAVIOR, "u1", b'{"type": "view"}')])  # invalid: skipped, counted
    out_dir = tmp_path / "archive"

    report = archive(
        settings, out_dir, [BEHAVIOR, CATALOG, FORGET], max_rows_per_file=4, idle_timeout_s=1.0
    )
    assert (report.rows, report.skipped) == (6, 1)
    assert report.by_topic == {BEHAVIOR.name: 3, CATALOG.name: 2, FORGET.name: 1}
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(p.name for p in report.files)
    assert all(re.fullmatch(r"events-\d{13}-\d{6}\.parquet", p.name) for p in report.files)
    rows = _read_log(report.files)
    assert all(len(pl.read_parquet(p)) <= 4 for p in report.files)
    assert sorted((from_row(row) for row in rows), key=lambda e: e.ts) == events[:6]
    assert {(row["topic"], row["event_id"]) for row in rows} == {
        (BEHAVIOR.name, events[0].event_id),
        (BEHAVIOR.name, events[1].event_id),
        (BEHAVIOR.name, events[2].event_id),
        (CATALOG.name, events[3].event_id),
        (CATALOG.name, events[4].event_id),
        (FORGET.name, events[5].event_id),
    }

    _produce_events(settings, events[6:])
    again = archive(settings, out_dir, [BEHAVIOR, CATALOG, FORGET], idle_timeout_s=1.0)
    assert (again.rows, again.skipped) == (1, 0)
    [row] = _read_log(again.files)
    assert from_row(row) == events[6]
    assert (row["topic"], row["offset"]) == (BEHAVIOR.name, 4)
    assert again.files[0].name.endswith(f"-{len(report.files):06d}.parquet")
