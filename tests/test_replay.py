"""replay: an event log to its topics in event-time order, keyed, at the speed asked for."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from clirun import run_cli

from consumers.consumer import read_topic
from infra.broker import free_port
from infra.cli import UserError
from infra.settings import Settings, load_settings
from producers.replay import replay
from schemas.eventlog import rows_to_frame, to_row
from schemas.events import (
    BehaviorEvent,
    DeadLetter,
    Event,
    ForgetUserEvent,
    ItemEvent,
    RecommendationEvent,
    RecommendedItem,
    ReviewEvent,
)
from schemas.topics import BEHAVIOR, CATALOG, DEAD_LETTER, FORGET, RECOMMENDATIONS

T0 = 1_700_000_000_000


def _write_log(path: Path, events: list[Event]) -> Path:
    rows = [to_row(e, topic="archived", partition=0, offset=n) for n, e in enumerate(events)]
    rows_to_frame(rows).write_parquet(path)
    return path


def _click(event_id: str, user: str, item: str, ts: int, kind: str = "click") -> BehaviorEvent:
    return BehaviorEvent(event_id=event_id, ts=ts, type=kind, user_id=user, item_id=item)


def _mixed_log() -> list[Event]:
    """Events in file order that is not event-time order, with a tie on ``ts``."""
    rec = RecommendationEvent(
        event_id="rec-1",
        ts=T0 + 2500,
        user_id="ann",
        trigger_event_id="b2",
        model_version="test",
        latency_ms=3.0,
        items=[RecommendedItem(item_id="i3", rank=1, score=0.9, reasons=["because"])],
    )
    dead = DeadLetter(
        event_id="dl-1",
        ts=T0 + 100,
        stage="validate-input",
        topic=BEHAVIOR.name,
        partition=0,
        offset=7,
        error_type="bad_json",
        error="not JSON",
        payload_b64="e30=",
    )
    return [
        _click("b3", "ann", "i3", T0 + 3000),
        rec,
        _click("b2", "bob", "i2", T0 + 2000, kind="purchase"),
        ItemEvent(type="item", event_id="it-2", ts=T0 + 500, item_id="i2", title="Two"),
        _click("b1", "ann", "i1", T0 + 1000),
        _click("b2v", "bob", "i2", T0 + 2000, kind="view"),  # same ts as b2: the view goes first
        dead,
        ReviewEvent(
            type="review", event_id="r1", ts=T0 + 4000, user_id="bob", item_id="i2", text="Great."
        ),
        ItemEvent(type="item", event_id="it-1", ts=T0, item_id="i1", title="One", categories=["a"]),
        ForgetUserEvent(type="forget_user", event_id="f1", ts=T0 + 5000, user_id="ann"),
    ]


def _read(settings: Settings, spec, timeout_s: float = 2.0) -> list[tuple[str, dict]]:
    return [
        (msg.key().decode(), json.loads(msg.value()))
        for msg in read_topic(settings, spec, timeout_s=timeout_s)
    ]


def test_replay_sends_every_input_event_keyed_in_event_time_order(
    settings: Settings, tmp_path: Path
) -> None:
    """At full speed every input event lands on its topic with its topic's key, in event-time
    order (ties broken by type), and recommendation and dead-letter rows are skipped."""
    events = _mixed_log()
    log = _write_log(tmp_path / "log.parquet", events)

    report = replay(settings, log, None, progress=False)

    assert report.sent == 8
    assert report.skipped == 2
    assert report.invalid == report.failed == 0
    assert report.by_topic == {BEHAVIOR.name: 5, CATALOG.name: 2, FORGET.name: 1}
    assert report.span_ms == 5000
    behaviour = _read(settings, BEHAVIOR)
    assert [(key, body["event_id"]) for key, body in behaviour] == [
        ("ann", "b1"),
        ("bob", "b2v"),
        ("bob", "b2"),
        ("ann", "b3"),
        ("bob", "r1"),
    ]
    assert behaviour[4][1] == {
        "event_id": "r1",
        "ts": T0 + 4000,
        "type": "review",
        "user_id": "bob",
        "item_id": "i2",
        "text": "Great.",
    }
    catalogue = _read(settings, CATALOG)
    assert [(key, body["event_id"]) for key, body in catalogue] == [("i1", "it-1"), ("i2", "it-2")]
    assert catalogue[0][1]["categories"] == ["a"]
    assert [(key, body["event_id"]) for key, body in _read(settings, FORGET)] == [("ann", "f1")]
    assert _read(settings, RECOMMENDATIONS, timeout_s=1.0) == []
    assert _read(settings, DEAD_LETTER, timeout_s=1.0) == []


def test_replay_at_a_speed_factor_takes_the_event_time_span_over_the_factor(
    settings: Settings, tmp_path: Path
) -> None:
    """With speed 4, a log spanning 2 s of event time takes at least 0.5 s of wall time (and
    not much more), and the progress output ends with the achieved rate."""
    events = [_click(f"e{n}", "ann", f"i{n}", T0 + n * 500) for n in range(5)]  # 2 s span
    log = _write_log(tmp_path / "paced.parquet", events)
    out = io.StringIO()

    report = replay(settings, log, 4.0, progress=True, out=out)

    assert report.sent == 5
    assert report.span_ms == 2000
    assert 0.45 <= report.seconds < 3.0
    assert report.events_per_s == pytest.approx(5 / report.seconds)
    last = out.getvalue().strip().splitlines()[-1]
    assert last.startswith("achieved ")
    assert "asked 4x" in last
    assert [b["event_id"] for _, b in _read(settings, BEHAVIOR)] == [f"e{n}" for n in range(5)]


def test_replay_of_a_missing_log_is_a_user_error(tmp_path: Path) -> None:
    """A log path that does not exist is a UserError naming it, raised before any broker use."""
    missing = tmp_path / "nope.parquet"
    unused = load_settings(
        data_dir=tmp_path, kafka={"bootstrap_servers": f"127.0.0.1:{free_port()}"}
    )
    with pytest.raises(UserError, match=r"event log not found: .*nope\.parquet"):
        replay(unused, missing, None, progress=False)


def test_cli_replay_of_a_missing_log_is_one_error_line(tmp_path: Path) -> None:
    """`recstream replay MISSING` exits 1 with one "recstream: error:" line and no traceback."""
    result = run_cli(["replay", str(tmp_path / "nope.parquet")], cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("recstream: error: event log not found:")
    assert "nope.parquet" in line
