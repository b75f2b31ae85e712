"""GroupLens MovieLens (ML-100k layout) -> rating and item events.

SRC is the directory holding ``u.data`` (user TAB item TAB rating TAB unix seconds) and, when
present, ``u.item`` (Latin-1, ``|``-separated: id, title, release date, video release date, IMDb
URL, then 19 genre flags) and ``u.genre`` (``name|index``, the genre names). Each rating becomes a
``rating`` event with ``value`` = the rating and ``ts`` = the rating's time in ms; each movie an
item event with its title, its genres as categories and ``{"year": ...}`` from its release date.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from infra.cli import UserError
from producers.importers.common import (
    Dataset,
    ImportReport,
    ItemDraft,
    build,
    require_dir,
    require_file,
    write_dataset,
)
from schemas.events import MAX_TITLE_CHARS, BehaviorEvent

GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
ENCODING = "latin-1"  # GroupLens ships u.item and u.genre in Latin-1
_ITEM_FIXED_FIELDS = 5  # id, title, release date, video release date, IMDb URL
_YEAR = re.compile(r"(\d{4})\s*$")


def _read_lines(path: Path) -> list[tuple[int, str]]:
    with path.open(encoding=ENCODING) as handle:
        return [(n, line.rstrip("\r\n")) for n, line in enumerate(handle, 1) if line.strip()]


def read_genres(path: Path) -> list[str]:
    """Genre names by flag position from ``u.genre``; the ML-100k list when it is absent."""
    if not path.is_file():
        return list(GENRES)
    names: dict[int, str] = {}
    for number, line in _read_lines(path):
        name, _, index = line.rpartition("|")
        if not name or not index.strip().isdigit():
            raise UserError(f"{path}:{number}: expected 'genre name|index'")
        names[int(index)] = name
    return [names.get(i, f"genre {i}") for i in range(max(names, default=-1) + 1)]


def read_items(path: Path, genres: list[str]) -> dict[str, ItemDraft]:
    """Movies from ``u.item``: title, genres with flag 1, release year."""
    items: dict[str, ItemDraft] = {}
    for number, line in _read_lines(path):
        fields = line.split("|")
        if len(fields) < _ITEM_FIXED_FIELDS or not fields[0].strip():
            raise UserError(f"{path}:{number}: expected id|title|release date|video date|url|flags")
        item_id, title, released = fields[0].strip(), fields[1].strip(), fields[2].strip()
        flags = fields[_ITEM_FIXED_FIELDS:]
        categories = [
            genres[i] if i < len(genres) else f"genre {i}"
            for i, flag in enumerate(flags)
            if flag.strip() == "1"
        ]
        year = _YEAR.search(released)
        items[item_id] = ItemDraft(
            title=title[:MAX_TITLE_CHARS] or item_id,
            categories=categories,
            attributes={"year": int(year.group(1))} if year else {},
        )
    return items


def read_movielens(src: Path) -> Dataset:
    """A MovieLens directory as rating events (file order kept in the event ids) and movies."""
    require_dir(src, "MovieLens directory")
    data = require_file(src / "u.data", "MovieLens ratings file u.data")
    source = f"movielens:{src.resolve().name}"
    events = []
    for number, line in _read_lines(data):
        fields = line.split("\t") if "\t" in line else line.split()
        where = f"{data}:{number}"
        if len(fields) != 4:
            raise UserError(f"{where}: expected user, item, rating and unix time separated by tabs")
        user, item, rating, seconds = (f.strip() for f in fields)
        try:
            value, ts = float(rating), int(seconds) * 1000
        except ValueError:
            raise UserError(f"{where}: rating and time must be numbers") from None
        events.append(
            build(
                BehaviorEvent,
                where,
                event_id=f"{source}:rating:{user}:{item}:{number}",
                ts=ts,
                type="rating",
                source=source,
                user_id=user,
                item_id=item,
                value=value,
            )
        )
    item_path = src / "u.item"
    items = read_items(item_path, read_genres(src / "u.genre")) if item_path.is_file() else {}
    for event in events:
        items.setdefault(event.item_id, ItemDraft(title=event.item_id))
    return Dataset(source=source, events=events, items=items)


def import_movielens(src: Path, out: Path, item_text: Path | None = None) -> ImportReport:
    """Import a MovieLens (ML-100k layout) directory into the event log ``out``."""
    started = time.perf_counter()
    return write_dataset(read_movielens(src), out, item_text, started)
