"""Amazon review JSON lines (2014 or 2018 dumps, gzipped or plain) -> purchase, review, item events.

SRC is one file with one JSON object per line: ``reviewerID``, ``asin``, ``overall``, ``summary``,
``reviewText``, ``unixReviewTime`` (other fields, such as 2018's vote, verified, style and image,
are ignored). Each review becomes a ``purchase`` and a ``review`` event at the review's time (the
log's type tie-break puts the purchase first); duplicate reviews of an item by a user are all kept,
with distinct event ids (the line number is part of the id). Reviews stamped on the same day are
ordered by the log's tie-break: user id, item id, type, event id.

Review text is ``summary. reviewText``. Items get title = the ASIN and nothing else: these files
carry no item metadata, and building item text from reviews here would leak future text into the
catalogue. Such items are described by the reviews that have arrived instead
(:mod:`models.profiles`).
"""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from infra.cli import UserError
from producers.importers.common import (
    Dataset,
    ImportReport,
    ItemDraft,
    build,
    one_line,
    require_file,
    write_dataset,
)
from schemas.events import MAX_RATING, MAX_TEXT_CHARS, BehaviorEvent, ReviewEvent

_GZIP_MAGIC = b"\x1f\x8b"
_SUFFIXES = (".gz", ".json", ".jsonl", ".ndjson")


def _open(path: Path) -> IO[str]:
    with path.open("rb") as handle:
        gzipped = handle.read(2) == _GZIP_MAGIC
    if gzipped:
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; UserError on anything not a JSON object."""
    try:
        with _open(path) as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(
                        f"{path}:{number}: not JSON lines ({exc.msg}); expected one review "
                        "object per line"
                    ) from None
                if not isinstance(record, dict):
                    raise UserError(f"{path}:{number}: expected a JSON object per line")
                yield number, record
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except (gzip.BadGzipFile, EOFError) as exc:
        raise UserError(one_line(f"{path}: damaged gzip file ({exc})")) from None


def _field(record: dict[str, Any], name: str, where: str) -> Any:
    value = record.get(name)
    if value is None or value == "":
        raise UserError(f"{where}: the review has no {name}")
    return value


def _text(record: dict[str, Any]) -> str:
    parts = [str(record.get(name) or "").strip() for name in ("summary", "reviewText")]
    return ". ".join(part for part in parts if part)[:MAX_TEXT_CHARS]


def _rating(record: dict[str, Any], where: str) -> float | None:
    overall = record.get("overall")
    if overall is None:
        return None
    try:
        return min(max(float(overall), 0.0), MAX_RATING)
    except (TypeError, ValueError):
        raise UserError(f"{where}: overall must be a number, not {overall!r}") from None


def source_name(path: Path) -> str:
    """The dataset name of a review file: its name without .gz/.json/.jsonl suffixes."""
    name = path.name
    while (suffix := Path(name).suffix.lower()) in _SUFFIXES and suffix:
        name = name[: -len(suffix)]
    return f"amazon-reviews:{name or path.name}"


def read_amazon_reviews(src: Path) -> Dataset:
    """An Amazon review file as purchase and review events, and its items (title = ASIN)."""
    require_file(src, "Amazon review file")
    source = source_name(src)
    events: list[BehaviorEvent | ReviewEvent] = []
    items: dict[str, ItemDraft] = {}
    for number, record in _records(src):
        where = f"{src}:{number}"
        user = str(_field(record, "reviewerID", where)).strip()
        item = str(_field(record, "asin", where)).strip()
        try:
            ts = int(_field(record, "unixReviewTime", where)) * 1000
        except (TypeError, ValueError):
            raise UserError(f"{where}: unixReviewTime must be whole seconds") from None
        common = {"ts": ts, "source": source, "user_id": user, "item_id": item}
        events.append(
            build(
                BehaviorEvent,
                where,
                event_id=f"{source}:purchase:{user}:{item}:{number}",
                type="purchase",
                **common,
            )
        )
        text = _text(record)
        if text:
            events.append(
                build(
                    ReviewEvent,
                    where,
                    event_id=f"{source}:review:{user}:{item}:{number}",
                    type="review",
                    text=text,
                    rating=_rating(record, where),
                    **common,
                )
            )
        items.setdefault(item, ItemDraft(title=item))
    return Dataset(source=source, events=events, items=items)


def import_amazon_reviews(src: Path, out: Path, item_text: Path | None = None) -> ImportReport:
    """Import an Amazon review JSON-lines file into the event log ``out``."""
    started = time.perf_counter()
    return write_dataset(read_amazon_reviews(src), out, item_text, started)
