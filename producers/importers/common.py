"""What every importer shares: the dataset it reads, item drafts, extra item text, writing the log.

An importer reads a public dataset into a :class:`Dataset` (validated behaviour and review events
plus item drafts); :func:`write_dataset` turns the drafts into item events stamped one millisecond
before the earliest behaviour (so a replay publishes the catalogue first), adds ``--item-text``,
and writes one event log in the documented order (:func:`schemas.eventlog.sorted_log`).
"""

from __future__ import annotations

import csv
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from infra.cli import UserError
from schemas.eventlog import rows_to_frame, sorted_log, to_row
from schemas.events import (
    MAX_TEXT_CHARS,
    MAX_TITLE_CHARS,
    BehaviorEvent,
    Event,
    ItemEvent,
    ReviewEvent,
)

EventT = TypeVar("EventT", bound=Event)
#: Separates text that ``--item-text`` appends from an item's own description.
APPENDED_TEXT_SEPARATOR = "\n"


@dataclass
class ItemDraft:
    """An item's catalogue fields before it becomes an :class:`ItemEvent` (ts not known yet)."""

    title: str
    description: str = ""
    categories: list[str] = field(default_factory=list)
    attributes: dict[str, str | int | float | bool] = field(default_factory=dict)


@dataclass
class Dataset:
    """A dataset read into events: behaviour and reviews (validated), and the catalogue drafts."""

    source: str
    events: Sequence[BehaviorEvent | ReviewEvent]
    items: dict[str, ItemDraft]


@dataclass
class ImportReport:
    """What an import wrote: event counts (total, by type), distinct users and items, time taken."""

    events: int
    users: int
    items: int
    interactions: int
    reviews: int
    seconds: float
    by_type: dict[str, int]
    out: Path
    source: str


def one_line(text: str) -> str:
    """Text collapsed to one line (messages of UserError must fit on one line)."""
    return " ".join(text.split())


def build(record: type[EventT], where: str, **fields: Any) -> EventT:
    """A validated event record; a validation failure becomes a UserError naming ``where``."""
    try:
        return record(**fields)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        name = ".".join(str(p) for p in err["loc"]) or "event"
        raise UserError(one_line(f"{where}: invalid {name}: {err['msg']}")) from None


def split_title(text: str, fallback: str) -> tuple[str, str]:
    """(title, description) of an item text: the title is the text up to the first ". "."""
    head, sep, rest = text.strip().partition(". ")
    if not head.strip():
        return fallback, rest.strip()[:MAX_TEXT_CHARS]
    title = head[:MAX_TITLE_CHARS].strip()
    overflow = head[MAX_TITLE_CHARS:]  # a title longer than allowed continues in the description
    description = (overflow + sep + rest).strip() if overflow else rest.strip()
    return title, description[:MAX_TEXT_CHARS]


def require_file(path: Path, what: str) -> Path:
    """``path`` if it is a readable file, else a UserError naming it."""
    if not path.exists():
        raise UserError(f"{what} not found: {path}")
    if not path.is_file():
        raise UserError(f"{what} is not a file: {path}")
    return path


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is a directory, else a UserError naming it."""
    if not path.exists():
        raise UserError(f"{what} not found: {path}")
    if not path.is_dir():
        raise UserError(f"{what} must be a directory: {path}")
    return path


def read_item_text(path: Path) -> list[tuple[str, str]]:
    """(item_id, text) pairs from a CSV with a header naming ``item_id`` and ``text``."""
    require_file(path, "item text file")
    pairs: list[tuple[str, str]] = []
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            if "item_id" not in header or "text" not in header:
                raise UserError(
                    f"{path}: the first line must be a header with columns item_id,text "
                    f"(found {','.join(header)[:80] or 'nothing'})"
                )
            for row in reader:
                item_id, text = (row.get("item_id") or "").strip(), (row.get("text") or "").strip()
                if not item_id:
                    raise UserError(f"{path}:{reader.line_num}: empty item_id")
                if text:
                    pairs.append((item_id, text))
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except csv.Error as exc:
        raise UserError(one_line(f"{path}: not a valid CSV file ({exc})")) from None
    return pairs


def add_item_text(items: dict[str, ItemDraft], pairs: list[tuple[str, str]]) -> None:
    """Append each text to its item's description; an unknown item is created from its text.

    A new item's title is the first 500 characters of its text and its description the rest, so
    the encoder never reads the same words twice.
    """
    for item_id, text in pairs:
        draft = items.get(item_id)
        if draft is None:
            items[item_id] = ItemDraft(
                title=text[:MAX_TITLE_CHARS], description=text[MAX_TITLE_CHARS:MAX_TEXT_CHARS]
            )
            continue
        joined = (
            f"{draft.description}{APPENDED_TEXT_SEPARATOR}{text}" if draft.description else text
        )
        draft.description = joined[:MAX_TEXT_CHARS]


def item_events(dataset: Dataset) -> list[ItemEvent]:
    """The catalogue as item events, stamped 1 ms before the dataset's earliest behaviour."""
    ts = min(event.ts for event in dataset.events) - 1
    return [
        build(
            ItemEvent,
            f"item {item_id}",
            event_id=f"{dataset.source}:item:{item_id}",
            ts=ts,
            type="item",
            source=dataset.source,
            item_id=item_id,
            title=draft.title,
            description=draft.description,
            categories=draft.categories,
            attributes=draft.attributes,
        )
        for item_id, draft in dataset.items.items()
    ]


def write_events(events: list[Event], out: Path) -> None:
    """The events as one sorted Parquet event log at ``out`` (a temp file, then renamed)."""
    if out.is_dir():
        raise UserError(f"output {out} is a directory; name a .parquet file")
    frame = sorted_log(rows_to_frame([to_row(event) for event in events])).collect()
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        frame.write_parquet(tmp)
        tmp.replace(out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None


def write_dataset(
    dataset: Dataset, out: Path, item_text: Path | None = None, started: float | None = None
) -> ImportReport:
    """Add item text, build the item events, write the log and report what it holds."""
    started = time.perf_counter() if started is None else started
    if not dataset.events:
        raise UserError(f"{dataset.source}: the dataset holds no interactions")
    if item_text is not None:
        add_item_text(dataset.items, read_item_text(item_text))
    catalogue = item_events(dataset)
    events: list[Event] = [*catalogue, *dataset.events]
    write_events(events, out)
    by_type = dict(sorted(Counter(event.type for event in events).items()))
    reviews = by_type.get("review", 0)
    return ImportReport(
        events=len(events),
        users=len({event.user_id for event in dataset.events}),
        items=len(catalogue),
        interactions=len(dataset.events) - reviews,
        reviews=reviews,
        seconds=time.perf_counter() - started,
        by_type=by_type,
        out=out,
        source=dataset.source,
    )
