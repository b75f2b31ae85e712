"""replay: an event log (Parquet) -> its topics, in event-time order, at a chosen speed.

Rows are read lazily (:func:`schemas.eventlog.scan_log`), put in the log's documented order
(:func:`schemas.eventlog.sorted_log`), collected once by polars' streaming engine and sent slice by
slice, so only one copy of the log is ever held. Only input events are sent; recommendation and
dead-letter rows are outputs of a past run and are counted as skipped. With ``speed`` = X, event i
is due at the wall-clock start plus (ts_i - ts_0) / X; the loop sleeps until then, serving
delivery reports meanwhile. ``speed=None`` sends as fast as the producer takes them.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import polars as pl
import structlog
from pydantic import ValidationError

from infra.cli import UserError, load_cli_settings
from infra.kafka import wait_for_broker
from infra.settings import Settings
from producers.producer import BehaviorProducer
from schemas.eventlog import from_row, scan_log, sorted_log
from schemas.events import INPUT_TYPES, Event
from schemas.topics import topic_for_type

log = structlog.get_logger(__name__)

#: Rows turned into Python objects at a time (the frame itself is held once, sliced zero-copy).
SLICE_ROWS = 10_000
_PROGRESS_EVERY_S = 0.5
#: The longest single sleep, so progress keeps ticking through long event-time gaps.
_MAX_SLEEP_S = 0.5


@dataclass
class ReplayReport:
    """What a replay did: events sent (per topic), rows skipped, wall time and rate."""

    sent: int = 0
    skipped: int = 0  # rows that are not input events (recommendation, dead_letter, unknown)
    seconds: float = 0.0
    events_per_s: float = 0.0
    by_topic: dict[str, int] = field(default_factory=dict)
    invalid: int = 0  # input rows that no longer validate (logged, not sent)
    failed: int = 0  # sent but not acknowledged by the broker
    span_ms: int = 0  # event time from the first to the last input event sent


def load_sorted_log(path: Path) -> pl.DataFrame:
    """The whole event log in event-time order, or :class:`UserError` saying why not."""
    try:
        return sorted_log(scan_log(path)).collect(engine="streaming")
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None
    except (OSError, pl.exceptions.PolarsError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read event log {path}: {first_line}") from None


def iter_rows(frame: pl.DataFrame, slice_rows: int = SLICE_ROWS) -> Iterator[dict[str, Any]]:
    """The frame's rows as dicts, materialised one slice at a time."""
    for offset in range(0, frame.height, slice_rows):
        yield from frame.slice(offset, slice_rows).iter_rows(named=True)


class _Progress:
    """Progress lines on ``out``: events sent, events/s and ETA; overwrites itself on a tty."""

    def __init__(self, enabled: bool, out: TextIO, total: int) -> None:
        self.enabled, self.out, self.total = enabled, out, total
        self.tty = out.isatty()
        self.started = self.last = time.monotonic()
        self.partial = False
        self.last_due: float | None = None  # when the last event is due (paced replays)

    def tick(self, sent: int, *, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < _PROGRESS_EVERY_S):
            return
        self.last = now
        rate = sent / max(now - self.started, 1e-9)
        eta = (self.total - sent) / rate if rate > 0 else float("inf")
        if self.last_due is not None:
            eta = max(eta, self.last_due - now)
        text = f"replayed {sent:,}/{self.total:,} events ({rate:,.0f}/s), ETA {_duration(eta)}"
        if self.tty:
            self.out.write("\r\033[K" + text)
            self.partial = True
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        prefix = "\r\033[K" if self.partial else ""
        self.out.write(prefix + text + "\n")
        self.out.flush()
        self.partial = False


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    if seconds < 60:
        return f"{max(seconds, 0.0):.0f} s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def input_events(frame: pl.DataFrame, report: ReplayReport) -> Iterator[Event]:
    """The log's input events in order; other rows counted as skipped, broken ones as invalid."""
    for row in iter_rows(frame):
        if row["type"] not in INPUT_TYPES:
            report.skipped += 1
            continue
        try:
            event = from_row(row)
        except ValidationError as exc:
            report.invalid += 1
            log.warning("replay_row_invalid", event_id=row.get("event_id"), error=str(exc)[:300])
            continue
        yield event


def _wait_until(due: float, producer: BehaviorProducer, tick: Callable[[], None]) -> None:
    """Block until monotonic time ``due``, serving delivery reports and progress meanwhile."""
    while (left := due - time.monotonic()) > 0:
        producer.poll(min(left, _MAX_SLEEP_S))  # blocks in librdkafka: a sleep, not a spin
        tick()


def replay(
    settings: Settings,
    log_path: Path,
    speed: float | None,
    *,
    progress: bool = True,
    out: TextIO | None = None,
) -> ReplayReport:
    """Send every input event of the log at ``log_path`` to its topic, in event-time order.

    Raises :class:`UserError` for a missing or unreadable log and
    :class:`infra.kafka.BrokerUnreachable` when no broker answers. Progress goes to ``out``
    (default: stderr).
    """
    if speed is not None and speed <= 0:
        raise UserError(f"speed must be positive, not {speed:g}")
    frame = load_sorted_log(log_path)
    is_input = pl.col("type").is_in(list(INPUT_TYPES))
    total, ts_end = frame.select(is_input.sum(), pl.col("ts").filter(is_input).max()).row(0)
    wait_for_broker(settings.kafka)
    report = ReplayReport()
    console = _Progress(progress, out or sys.stderr, int(total or 0))
    producer = BehaviorProducer(settings)
    started = time.monotonic()
    ts_first: int | None = None
    ts_last: int | None = None
    try:
        for event in input_events(frame, report):
            if ts_first is None:
                ts_first = event.ts
                if speed is not None:
                    console.last_due = started + (ts_end - ts_first) / 1000 / speed
            elif speed is not None:
                due = started + (event.ts - ts_first) / 1000 / speed
                _wait_until(due, producer, lambda: console.tick(report.sent))
            producer.send(event)
            ts_last = event.ts
            report.sent += 1
            topic = topic_for_type(event.type).name
            report.by_topic[topic] = report.by_topic.get(topic, 0) + 1
            console.tick(report.sent)
    finally:
        undelivered = producer.close()
    report.failed = max(producer.failed, undelivered)
    report.seconds = time.monotonic() - started
    report.events_per_s = report.sent / max(report.seconds, 1e-9)
    report.span_ms = ts_last - ts_first if ts_first is not None and ts_last is not None else 0
    console.tick(report.sent, force=True)
    console.line(_achieved(report, speed))
    return report


def _achieved(report: ReplayReport, speed: float | None) -> str:
    """The achieved rate, and the achieved speed-up of event time against the one asked for."""
    text = f"achieved {report.events_per_s:,.0f} events/s over {report.seconds:.1f} s"
    if report.span_ms > 0 and report.seconds > 0:
        factor = report.span_ms / 1000 / report.seconds
        asked = "max" if speed is None else f"{speed:g}x"
        text += f", {factor:,.1f}x event time (asked {asked})"
    return text


def cli_replay(args: argparse.Namespace) -> int:
    """``recstream replay LOG [--speed X|max]``; exit 1 if any event was invalid or undelivered."""
    settings = load_cli_settings(args)
    report = replay(settings, args.log, args.speed, progress=True)
    topics = ", ".join(f"{name}: {n:,}" for name, n in sorted(report.by_topic.items()))
    print(
        f"replayed {report.sent:,} events in {report.seconds:.1f} s "
        f"({report.events_per_s:,.0f}/s; {topics or 'none'}); skipped {report.skipped:,}; "
        f"invalid {report.invalid:,}; undelivered {report.failed:,}"
    )
    return 1 if report.invalid or report.failed else 0
