"""The event-log schema: how events are stored in Parquet (archive writes it, replay reads it).

One row per event: the envelope, every per-type field (null where a type has none), and where the
event came from. Item ``attributes`` and recommendation ``items`` are stored as JSON text so that
the schema stays flat and stable as records gain fields.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import polars as pl

from schemas.events import ALL_TYPES, DeadLetter, Event

EVENT_LOG_SCHEMA: dict[str, Any] = {
    "event_id": pl.String,
    "ts": pl.Int64,
    "type": pl.String,
    "source": pl.String,
    "user_id": pl.String,
    "item_id": pl.String,
    "value": pl.Float64,
    "text": pl.String,
    "rating": pl.Float64,
    "title": pl.String,
    "description": pl.String,
    "categories": pl.List(pl.String),
    "attributes": pl.String,
    "available": pl.Boolean,
    "items": pl.String,
    "trigger_event_id": pl.String,
    "model_version": pl.String,
    "latency_ms": pl.Float64,
    "stage": pl.String,
    "error_type": pl.String,
    "error": pl.String,
    "payload_b64": pl.String,
    "dl_topic": pl.String,
    "dl_partition": pl.Int32,
    "dl_offset": pl.Int64,
    "topic": pl.String,
    "partition": pl.Int32,
    "offset": pl.Int64,
}
_JSON_COLUMNS = ("attributes", "items")
#: A dead letter's own topic/partition/offset name the rejected input; in the log they get their
#: own columns so that ``topic``/``partition``/``offset`` always say where the row was read from.
_RENAMED = {"topic": "dl_topic", "partition": "dl_partition", "offset": "dl_offset"}


def to_row(
    event: Event, topic: str | None = None, partition: int | None = None, offset: int | None = None
) -> dict[str, Any]:
    """One event as an event-log row (every schema column present)."""
    data = event.model_dump(mode="json", exclude_none=True)
    renames = _RENAMED if isinstance(event, DeadLetter) else {}
    row: dict[str, Any] = dict.fromkeys(EVENT_LOG_SCHEMA)
    for field, value in data.items():
        name = renames.get(field, field)
        if name in row:
            row[name] = json.dumps(value, sort_keys=True) if name in _JSON_COLUMNS else value
    row.update(topic=topic, partition=partition, offset=offset)
    return row


def rows_to_frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    """Event-log rows as a DataFrame with exactly :data:`EVENT_LOG_SCHEMA`."""
    return pl.DataFrame(rows, schema=EVENT_LOG_SCHEMA, orient="row")


def write_atomically(frame: pl.DataFrame, path: Path) -> None:
    """Write ``frame`` to ``path`` as Parquet through a hidden temporary file and a rename, so a
    reader never sees half a file (the temporary file is removed if writing fails)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        frame.write_parquet(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def from_row(row: dict[str, Any]) -> Event:
    """An event-log row back to its event record (unknown columns and nulls ignored)."""
    record = ALL_TYPES[row["type"]]
    renames = _RENAMED if record is DeadLetter else {}
    data = {}
    for name in record.model_fields:
        value = row.get(renames.get(name, name))
        if value is None:
            continue
        data[name] = json.loads(value) if name in _JSON_COLUMNS else value
    return record.model_validate(data)


#: Order of event types that share a timestamp: the catalogue first, then behaviour from the
#: weakest signal to the strongest, the review after the purchase it follows, forget last.
TYPE_ORDER: dict[str, int] = {
    "item": 0,
    "item_removed": 1,
    "view": 2,
    "click": 3,
    "add_to_cart": 4,
    "purchase": 5,
    "rating": 6,
    "review": 7,
    "forget_user": 8,
    "recommendation": 9,
    "dead_letter": 10,
}
#: Columns an event log is sorted by: event time, then the tie-break. Events with equal ``ts`` are
#: ordered by user id (catalogue events, which have none, first), then item id, then type
#: (:data:`TYPE_ORDER`: a review right after the purchase of the same item), then event id, so
#: the order never depends on file order or on the reader, and a user's events on one item stay
#: together.
SORT_COLUMNS = ("ts", "user_id", "item_id", "_type_rank", "event_id")


def sorted_log(frame: pl.LazyFrame | pl.DataFrame) -> pl.LazyFrame:
    """The event log in event-time order with the documented deterministic tie-break."""
    lazy = frame.lazy()
    ranked = lazy.with_columns(
        pl.col("type").replace_strict(TYPE_ORDER, default=len(TYPE_ORDER)).alias("_type_rank")
    )
    return ranked.sort(list(SORT_COLUMNS), nulls_last=False).drop("_type_rank")


def scan_log(path: Path) -> pl.LazyFrame:
    """A lazy scan of an event log: one Parquet file, or every ``*.parquet`` in a directory."""
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"no .parquet files in {path}")
        return pl.scan_parquet(files)
    if not path.is_file():
        raise FileNotFoundError(f"event log not found: {path}")
    return pl.scan_parquet(path)
