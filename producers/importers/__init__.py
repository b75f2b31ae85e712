"""Dataset importers: public recommendation datasets -> one Parquet event log.

Each format reader builds validated contract events (:mod:`schemas.events`); the catalogue is
stamped one millisecond before the first behaviour so a replay publishes it first, and the log is
written in the documented order (:func:`schemas.eventlog.sorted_log`). Event ids are deterministic
(``{source}:{type}:{user}:{item}:{position}``, ``{source}:item:{item}``), so importing the same
files twice gives the same log.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from infra.cli import UserError
from producers.importers.amazon import import_amazon_reviews, read_amazon_reviews
from producers.importers.common import Dataset, ImportReport, ItemDraft, write_dataset
from producers.importers.movielens import import_movielens, read_movielens
from producers.importers.recbole import import_recbole, read_recbole

#: Format name (as ``recstream data import --format`` spells it) -> reader.
READERS: dict[str, Callable[[Path], Dataset]] = {
    "recbole": read_recbole,
    "movielens": read_movielens,
    "amazon-reviews": read_amazon_reviews,
}


def import_dataset(fmt: str, src: Path, out: Path, item_text: Path | None = None) -> ImportReport:
    """Import ``src`` in format ``fmt`` into the event log ``out``, plus optional item text."""
    reader = READERS.get(fmt)
    if reader is None:
        raise UserError(f"unknown dataset format {fmt!r}; expected one of {', '.join(READERS)}")
    started = time.perf_counter()
    return write_dataset(reader(Path(src)), Path(out), item_text, started)


__all__ = [
    "READERS",
    "Dataset",
    "ImportReport",
    "ItemDraft",
    "import_amazon_reviews",
    "import_dataset",
    "import_movielens",
    "import_recbole",
    "read_amazon_reviews",
    "read_movielens",
    "read_recbole",
    "write_dataset",
]
