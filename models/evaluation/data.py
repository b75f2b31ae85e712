"""An event log as evaluation data: the catalogue, and every user's interactions in event order."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from schemas.eventlog import from_row, scan_log, sorted_log
from schemas.events import ItemEvent
from schemas.scoring import INTERACTION_TYPES

_COLUMNS = [
    "event_id",
    "ts",
    "type",
    "source",
    "user_id",
    "item_id",
    "value",
    "rating",
    "text",
    "title",
    "description",
    "categories",
    "attributes",
    "available",
]


@dataclass(frozen=True, slots=True)
class Interaction:
    """One interaction of a user with an item (a review carries its text)."""

    user_id: str
    item_id: str
    kind: str
    ts: int
    event_id: str
    value: float | None = None
    text: str | None = None


@dataclass
class Dataset:
    """What evaluation needs from an event log."""

    name: str
    item_text: dict[str, str]  # item id -> the text the encoder sees
    item_title: dict[str, str]
    interactions: list[Interaction]  # every user's interactions, in event-time order
    by_user: dict[str, list[Interaction]] = field(default_factory=dict)

    @property
    def catalogue(self) -> list[str]:
        return list(self.item_text)


def load_dataset(path: Path, name: str | None = None) -> Dataset:
    """Read an event log (a Parquet file or a directory of them) for evaluation."""
    # Only the columns evaluation reads; the frame is dropped once the interactions are built.
    frame = sorted_log(scan_log(path)).select(_COLUMNS).collect()
    item_text: dict[str, str] = {}
    item_title: dict[str, str] = {}
    interactions: list[Interaction] = []
    for row in frame.iter_rows(named=True):
        kind = row["type"]
        if kind == "item":
            item = from_row(row)
            assert isinstance(item, ItemEvent)
            item_text[item.item_id] = item.text()  # exactly what the stream's encoder sees
            item_title[item.item_id] = item.title
        elif kind == "item_removed":
            continue  # evaluation ranks over every item the log ever offered
        elif kind in INTERACTION_TYPES and row["user_id"] and row["item_id"]:
            value = row["rating"] if kind == "review" else row["value"]
            interactions.append(
                Interaction(
                    row["user_id"],
                    row["item_id"],
                    kind,
                    row["ts"],
                    row["event_id"],
                    value,
                    row["text"],
                )
            )
    for inter in interactions:  # items seen only in behaviour still belong to the catalogue
        item_text.setdefault(inter.item_id, inter.item_id)
        item_title.setdefault(inter.item_id, inter.item_id)
    by_user: dict[str, list[Interaction]] = defaultdict(list)
    for inter in interactions:
        by_user[inter.user_id].append(inter)
    return Dataset(name or path.stem, item_text, item_title, interactions, dict(by_user))


def distinct_sequence(interactions: list[Interaction]) -> list[list[Interaction]]:
    """A user's interactions grouped into steps: a repeat of the previous item joins its step.

    This is the same rule the user state and the scoring use: a review right after the purchase
    of the same item is one interaction.
    """
    steps: list[list[Interaction]] = []
    for inter in interactions:
        if steps and steps[-1][-1].item_id == inter.item_id:
            steps[-1].append(inter)
        else:
            steps.append([inter])
    return steps


def pl_counts(items: list[str]) -> dict[str, int]:
    """How often each item occurs (polars, for large logs)."""
    if not items:
        return {}
    counts = pl.Series("item", items).value_counts()
    return dict(zip(counts["item"].to_list(), counts["count"].to_list(), strict=True))
