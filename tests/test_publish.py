"""publish_file against the embedded broker: JSONL, CSV and Parquet routing, bad rows, bad files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from consumers.consumer import read_topic
from infra.settings import Settings, load_settings
from producers.publish import PublishError, publish_file, read_events
from schemas.eventlog import rows_to_frame, to_row
from schemas.events import BehaviorEvent, Event, ItemEvent
from schemas.serde import decode_input, validate_object
from schemas.topics import BEHAVIOR, CATALOG, FORGET, TopicSpec

TS = 1_700_000_000_000

EVENTS: list[dict[str, Any]] = [
    {"event_id": "e1", "ts": TS, "type": "view", "user_id": "u1", "item_id": "i1"},
    {"event_id": "e2", "ts": TS + 1, "type": "purchase", "user_id": "u2", "item_id": "i1"},
    {
        "event_id": "e3",
        "ts": TS + 2,
        "type": "rating",
        "user_id": "u1",
        "item_id": "i2",
        "value": 4,
    },
    {
        "event_id": "e4",
        "ts": TS + 3,
        "type": "review",
        "user_id": "u3",
        "item_id": "i2",
        "text": "Accurate to the microlitre.",
        "rating": 5,
    },
    {
        "event_id": "e5",
        "ts": TS + 4,
        "type": "item",
        "item_id": "i1",
        "title": "Pipette",
        "description": "10 ul",
        "categories": ["lab", "glass"],
        "attributes": {"ml": 0.01},
    },
    {
        "event_id": "e6",
        "ts": TS + 5,
        "type": "item",
        "item_id": "i3",
        "title": "Flask",
        "available": False,
    },
    {"event_id": "e7", "ts": TS + 6, "type": "item_removed", "item_id": "i4"},
    {"event_id": "e8", "ts": TS + 7, "type": "forget_user", "user_id": "u9"},
]
EXPECTED_BY_TOPIC = {BEHAVIOR.name: 4, CATALOG.name: 3, FORGET.name: 1}


def _read(settings: Settings, spec: TopicSpec) -> list[tuple[str, Event]]:
    """(key, decoded event) for every message on a topic, read until it is idle for 0.5 s."""
    return [
        (msg.key().decode(), decode_input(msg.value(), spec.name))
        for msg in read_topic(settings, spec, timeout_s=0.5)
    ]


def _all_published(settings: Settings) -> list[tuple[str, Event]]:
    return [pair for spec in (BEHAVIOR, CATALOG, FORGET) for pair in _read(settings, spec)]


def _write_jsonl(path: Path, objects: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(obj) + "\n" for obj in objects), encoding="utf-8")
    return path


def test_jsonl_events_are_routed_to_their_topics(settings: Settings, tmp_path: Path) -> None:
    """Every JSONL line is sent unchanged to its type's topic, keyed by that topic's key."""
    path = _write_jsonl(tmp_path / "events.jsonl", EVENTS)
    report = publish_file(settings, path, progress=False)
    assert (report.sent, report.rejected, report.failed) == (8, 0, 0)
    assert report.by_topic == EXPECTED_BY_TOPIC
    published = _all_published(settings)
    assert [event for _, event in published] == [validate_object(obj) for obj in EVENTS]
    assert [key for key, _ in published] == ["u1", "u2", "u1", "u3", "i1", "i3", "i4", "u9"]


def test_csv_cells_are_converted_to_typed_fields(settings: Settings, tmp_path: Path) -> None:
    """CSV cells become typed fields: numbers, a|b or JSON categories, JSON attributes, booleans."""
    path = tmp_path / "events.csv"
    path.write_text(
        "type,event_id,ts,user_id,item_id,value,title,categories,attributes,available\n"
        "view,c1,1700000000000,u1,i1,,,,,\n"
        "rating,c2,1700000000001,u1,i2,3.5,,,,\n"
        'item,c3,1700000000002,,i1,,Pipette,lab|glass,"{""ml"": 10}",false\n'
        'item,c4,1700000000003,,i2,,Flask,"[""lab""]",,\n'
        "forget_user,c5,1700000000004,u1,,,,,,\n",
        encoding="utf-8",
    )
    report = publish_file(settings, path, progress=False)
    assert (report.sent, report.rejected) == (5, 0)
    assert report.by_topic == {BEHAVIOR.name: 2, CATALOG.name: 2, FORGET.name: 1}
    events = {event.event_id: event for _, event in _all_published(settings)}
    assert events["c1"].ts == TS
    assert events["c2"].value == 3.5  # type: ignore[attr-defined]
    pipette, flask = events["c3"], events["c4"]
    assert isinstance(pipette, ItemEvent)
    assert isinstance(flask, ItemEvent)
    assert (pipette.categories, pipette.attributes, pipette.available) == (
        ["lab", "glass"],
        {"ml": 10},
        False,
    )
    assert (flask.categories, flask.attributes, flask.available) == (["lab"], {}, True)
    assert events["c5"].type == "forget_user"


def test_parquet_event_log_and_column_subset_publish(settings: Settings, tmp_path: Path) -> None:
    """An event-log Parquet file republishes the same events; a file of a few columns works too."""
    log_path = tmp_path / "log.parquet"
    originals = [validate_object(obj) for obj in EVENTS]
    rows = [to_row(event, "some.topic", 0, offset) for offset, event in enumerate(originals)]
    rows_to_frame(rows).write_parquet(log_path)
    subset_path = tmp_path / "subset.parquet"
    pl.DataFrame(
        {"type": ["click", "view"], "user_id": ["u7", "u8"], "item_id": ["i1", "i2"]}
    ).write_parquet(subset_path)

    report = publish_file(settings, log_path, progress=False)
    assert (report.sent, report.rejected) == (8, 0)
    assert report.by_topic == EXPECTED_BY_TOPIC
    subset = publish_file(settings, subset_path, progress=False)
    assert (subset.sent, subset.by_topic) == (2, {BEHAVIOR.name: 2})

    published = [event for _, event in _all_published(settings)]
    by_id = {event.event_id: event for event in published}
    assert [by_id[event.event_id] for event in originals] == originals
    original_ids = {event.event_id for event in originals}
    extra = [e for e in published if e.event_id not in original_ids]
    assert all(isinstance(e, BehaviorEvent) for e in extra)
    assert [(e.type, e.user_id) for e in extra if isinstance(e, BehaviorEvent)] == [
        ("click", "u7"),
        ("view", "u8"),
    ]
    assert len(published) == 10


def test_bad_rows_are_reported_and_the_rest_sent(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A row that fails validation is not sent; its row number and reason are reported."""
    lines = [json.dumps(obj) for obj in EVENTS[:2]]
    lines.append(json.dumps({"type": "view", "user_id": "u1"}))  # line 3: no item_id
    lines.append("")  # blank lines are skipped but still counted
    lines.append(json.dumps(EVENTS[2]))
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    report = publish_file(settings, path, progress=False)
    assert (report.sent, report.rejected) == (3, 1)
    assert report.by_topic == {BEHAVIOR.name: 3}
    [(row, reason)] = report.rejections
    assert row == 3
    assert "item_id" in reason
    assert "events.jsonl:3: rejected: view: item_id: Field required" in capsys.readouterr().err
    assert [event.event_id for _, event in _read(settings, BEHAVIOR)] == ["e1", "e2", "e3"]


def test_unparsable_rows_are_reported_with_their_numbers(tmp_path: Path) -> None:
    """A non-JSON JSONL line and a non-numeric CSV value are reported by line, the rest read."""
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"type": "view"}\nnot json\n[1, 2]\n', encoding="utf-8")
    errors: list[tuple[int, str]] = []
    rows = list(read_events(jsonl, on_error=lambda n, why: errors.append((n, why))))
    assert rows == [(1, {"type": "view"})]
    assert [n for n, _ in errors] == [2, 3]
    assert errors[0][1].startswith("not JSON")
    assert errors[1][1] == "a JSON list, not an object"

    csv_path = tmp_path / "b.csv"
    csv_path.write_text(
        "type,user_id,item_id,value\nrating,u1,i1,x\nview,u1,i1,\n", encoding="utf-8"
    )
    errors.clear()
    rows = list(read_events(csv_path, on_error=lambda n, why: errors.append((n, why))))
    assert rows == [(3, {"type": "view", "user_id": "u1", "item_id": "i1"})]
    assert errors == [(2, "value: 'x' is not a number")]


@pytest.mark.parametrize(
    ("name", "content", "fmt", "message"),
    [
        ("missing.jsonl", None, None, "file not found: "),
        ("events.txt", "{}", None, "cannot tell the format of events.txt from its extension"),
        ("events.jsonl", "{}", "xml", "unknown format 'xml'; expected one of jsonl, csv, parquet"),
        ("broken.parquet", "not parquet at all", None, "cannot read Parquet broken.parquet: "),
    ],
)
def test_unusable_files_raise_one_line_publish_errors(
    tmp_path: Path, name: str, content: str | None, fmt: str | None, message: str
) -> None:
    """A missing, unrecognised or unreadable file raises PublishError with a one-line message."""
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    nowhere = load_settings(kafka={"bootstrap_servers": "127.0.0.1:1"})  # never contacted
    with pytest.raises(PublishError) as raised:
        publish_file(nowhere, path, fmt, progress=False)
    text = str(raised.value)
    assert message in text
    assert "\n" not in text


def test_empty_file_has_no_events(settings: Settings, tmp_path: Path) -> None:
    """A file without a single event raises PublishError saying so."""
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(PublishError, match=r"^empty\.jsonl has no events$"):
        publish_file(settings, path, progress=False)
