"""publish: send a file of contract events (JSONL, CSV or Parquet) to their topics.

Every object is validated before it is sent; invalid rows are not sent but counted and reported
with their row number and reason. Row numbers are line numbers for JSONL and CSV (the CSV header is
line 1) and 1-based row positions for Parquet and JSON arrays.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import polars as pl

from infra.kafka import wait_for_broker
from infra.settings import Settings
from producers.producer import BehaviorProducer
from schemas.serde import InvalidEvent
from schemas.topics import topic_for_type

FORMATS = ("jsonl", "csv", "parquet")
_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
}
#: Event-log columns that say where an archived event came from; not part of the event itself.
_LOG_ONLY_COLUMNS = frozenset({"topic", "partition", "offset"})
_JSON_COLUMNS = ("attributes", "items")
_MAX_PRINTED_REJECTIONS = 20
_MAX_KEPT_REJECTIONS = 1000
_PROGRESS_EVERY_S = 0.5

#: Called with (row number, reason) for a row that cannot be turned into an object.
RowErrorHandler = Callable[[int, str], None]


class PublishError(Exception):
    """The file cannot be published at all (missing, unknown format, unreadable, empty)."""


@dataclass
class PublishReport:
    """What a publish run did: events sent, rows rejected (with reasons), per-topic counts."""

    sent: int = 0
    rejected: int = 0
    by_topic: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    failed: int = 0  # sent but not acknowledged by the broker
    rejections: list[tuple[int, str]] = field(default_factory=list)  # the first 1000


# -- reading ---------------------------------------------------------------------------------


def detect_format(path: Path, fmt: str | None = None) -> str:
    """The format named by ``fmt``, else the one the extension says; PublishError if unknown."""
    if fmt is not None:
        if fmt.lower() not in FORMATS:
            raise PublishError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
        return fmt.lower()
    kind = _EXTENSIONS.get(path.suffix.lower())
    if kind is None:
        known = ", ".join(sorted(_EXTENSIONS))
        raise PublishError(
            f"cannot tell the format of {path.name} from its extension ({known}); use --format"
        )
    return kind


def read_events(
    path: Path, fmt: str | None = None, *, on_error: RowErrorHandler | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number, object) for each event in a JSONL, CSV or Parquet file.

    The file and its format are checked at once (:class:`PublishError`); a row that cannot be made
    into an object goes to ``on_error`` and is skipped, or raises PublishError without a handler.
    """
    if not path.is_file():
        raise PublishError(f"file not found: {path}")
    kind = detect_format(path, fmt)
    handler = on_error or _raise_row_error(path)
    if kind == "parquet":
        return _parquet_rows(_read_parquet(path), handler)
    if kind == "csv":
        return _csv_rows(path, handler)
    return _jsonl_rows(path, handler)


def _raise_row_error(path: Path) -> RowErrorHandler:
    def handler(row: int, reason: str) -> None:
        raise PublishError(f"{path.name}:{row}: {reason}")

    return handler


def _jsonl_rows(path: Path, on_error: RowErrorHandler) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        with path.open(encoding="utf-8") as fh:
            head = fh.read(4096).lstrip()
            fh.seek(0)
            if head.startswith("["):
                yield from _json_array_rows(path, fh.read(), on_error)
                return
            for lineno, line in enumerate(fh, start=1):
                if line.strip():
                    obj = _json_object(line, lineno, on_error)
                    if obj is not None:
                        yield lineno, obj
    except UnicodeDecodeError as exc:
        raise PublishError(f"cannot read {path.name}: not UTF-8 text ({exc.reason})") from None


def _json_array_rows(
    path: Path, text: str, on_error: RowErrorHandler
) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PublishError(
            f"cannot read {path.name}: not JSON ({exc.msg}, line {exc.lineno})"
        ) from None
    for index, obj in enumerate(items, start=1):
        if isinstance(obj, dict):
            yield index, obj
        else:
            on_error(index, f"a JSON {type(obj).__name__}, not an object")


def _json_object(line: str, lineno: int, on_error: RowErrorHandler) -> dict[str, Any] | None:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        on_error(lineno, f"not JSON: {exc.msg} at char {exc.pos}")
        return None
    if not isinstance(obj, dict):
        on_error(lineno, f"a JSON {type(obj).__name__}, not an object")
        return None
    return obj


def _csv_rows(path: Path, on_error: RowErrorHandler) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            for row in reader:
                try:
                    yield reader.line_num, csv_row_to_object(row)
                except ValueError as exc:
                    on_error(reader.line_num, str(exc))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise PublishError(f"cannot read CSV {path.name}: {exc}") from None


def csv_row_to_object(row: dict[str | None, str | list[str] | None]) -> dict[str, Any]:
    """One CSV row as a contract object: empty cells absent, typed columns converted."""
    if None in row:
        raise ValueError("row has more cells than the header has columns")
    obj: dict[str, Any] = {}
    for name, cell in row.items():
        if name is None or cell is None or not isinstance(cell, str) or cell.strip() == "":
            continue
        obj[name] = _convert_cell(name, cell)
    return obj


def _convert_cell(name: str, cell: str) -> Any:
    convert = _CELL_CONVERTERS.get(name)
    return convert(name, cell.strip()) if convert else cell


def _whole_number(name: str, text: str) -> int:
    number = _number(name, text)
    if not number.is_integer():
        raise ValueError(f"{name}: {text!r} is not a whole number of milliseconds")
    return int(number)


def _number(name: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{name}: {text!r} is not a number") from None


def _boolean(name: str, text: str) -> bool:
    lowered = text.lower()
    if lowered not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"{name}: {text!r} is not true or false")
    return lowered in ("true", "1", "yes")


def _string_list(name: str, text: str) -> Any:
    if text.startswith("["):
        return _json_cell(name, text)
    return [part.strip() for part in text.split("|") if part.strip()]


def _json_cell(name: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name}: not JSON ({exc.msg})") from None


#: CSV columns that are not plain strings, and how to read them.
_CELL_CONVERTERS: dict[str, Callable[[str, str], Any]] = {
    "ts": _whole_number,
    "value": _number,
    "rating": _number,
    "available": _boolean,
    "categories": _string_list,
    "attributes": _json_cell,
    "items": _json_cell,
}


def _read_parquet(path: Path) -> pl.DataFrame:
    try:
        return pl.read_parquet(path)
    except (OSError, pl.exceptions.PolarsError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PublishError(f"cannot read Parquet {path.name}: {first_line}") from None


def _parquet_rows(
    frame: pl.DataFrame, on_error: RowErrorHandler
) -> Iterator[tuple[int, dict[str, Any]]]:
    for index, row in enumerate(frame.iter_rows(named=True), start=1):
        try:
            yield index, parquet_row_to_object(row)
        except ValueError as exc:
            on_error(index, str(exc))


def parquet_row_to_object(row: dict[str, Any]) -> dict[str, Any]:
    """One Parquet row (event-log columns or any subset) as a contract object."""
    obj: dict[str, Any] = {}
    for name, value in row.items():
        if value is None or name in _LOG_ONLY_COLUMNS:
            continue
        if name in _JSON_COLUMNS and isinstance(value, str):
            obj[name] = _json_cell(name, value)
        elif name == "ts" and isinstance(value, dt.datetime):
            aware = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
            obj[name] = int(aware.timestamp() * 1000)
        else:
            obj[name] = value
    return obj


# -- publishing ------------------------------------------------------------------------------


class _Console:
    """Progress and rejection lines on stderr; progress overwrites itself on a terminal."""

    def __init__(self, path: Path, progress: bool, err: TextIO) -> None:
        self.path, self.progress, self.err = path, progress, err
        self.tty = err.isatty()
        self.partial = False
        self.last = time.monotonic()

    def rejected(self, report: PublishReport, row: int, reason: str) -> None:
        report.rejected += 1
        if len(report.rejections) < _MAX_KEPT_REJECTIONS:
            report.rejections.append((row, reason))
        if report.rejected <= _MAX_PRINTED_REJECTIONS:
            self.line(f"{self.path.name}:{row}: rejected: {reason}")

    def tick(self, report: PublishReport, started: float, *, final: bool = False) -> None:
        now = time.monotonic()
        if not self.progress or (not final and now - self.last < _PROGRESS_EVERY_S):
            return
        self.last = now
        rate = report.sent / max(now - started, 1e-9)
        text = f"published {report.sent:,} events ({rate:,.0f}/s), {report.rejected:,} rejected"
        if final or not self.tty:
            self.line(text)
        else:
            self.err.write("\r" + text)
            self.err.flush()
            self.partial = True

    def line(self, text: str) -> None:
        prefix = "\r\033[K" if self.partial else ""
        self.err.write(prefix + text + "\n")
        self.err.flush()
        self.partial = False


def publish_file(
    settings: Settings, path: Path, fmt: str | None = None, progress: bool = True
) -> PublishReport:
    """Validate every event in ``path`` and send the valid ones to their topics.

    Raises :class:`PublishError` for a file that cannot be published and
    :class:`infra.kafka.BrokerUnreachable` when no broker answers.
    """
    console = _Console(path, progress, sys.stderr)
    report = PublishReport()
    rows = read_events(path, fmt, on_error=lambda row, why: console.rejected(report, row, why))
    wait_for_broker(settings.kafka)
    started = time.monotonic()
    producer = BehaviorProducer(settings)
    try:
        _send_all(producer, rows, report, console, started)
    finally:
        undelivered = producer.close()
    report.failed = max(producer.failed, undelivered)
    report.seconds = time.monotonic() - started
    if report.sent + report.rejected == 0:
        raise PublishError(f"{path.name} has no events")
    if report.rejected > _MAX_PRINTED_REJECTIONS:
        console.line(f"... and {report.rejected - _MAX_PRINTED_REJECTIONS:,} more rejected rows")
    console.tick(report, started, final=True)
    return report


def _send_all(
    producer: BehaviorProducer,
    rows: Iterator[tuple[int, dict[str, Any]]],
    report: PublishReport,
    console: _Console,
    started: float,
) -> None:
    """Validate and send each row, counting it as sent (per topic) or rejected."""
    for row, obj in rows:
        try:
            event = producer.send_dict(obj)
        except InvalidEvent as exc:
            console.rejected(report, row, str(exc))
            continue
        report.sent += 1
        topic = topic_for_type(event.type).name
        report.by_topic[topic] = report.by_topic.get(topic, 0) + 1
        console.tick(report, started)
