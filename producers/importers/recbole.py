"""RecBole atomic datasets (as processed by UniSRec / VQ-Rec) -> purchase and item events.

A dataset directory holds ``NAME.{train,valid,test}.inter`` (``user_id:token``,
``item_id_list:token_seq``, ``item_id:token``; remapped indices), optionally ``NAME.text``
(``item_id:token``, ``text:token_seq``, keyed by raw id) and ``NAME.item2index`` /
``NAME.user2index`` (raw id -> index). Histories in the ``.inter`` files keep only the most recent
items (50 in UniSRec's files), so each user's full sequence is rebuilt by chaining the train rows:
start from the row with the shortest history, then repeatedly take the row whose history equals the
last ``limit`` items so far (``limit`` = the longest history in the files), then the valid target,
then the test target. Leave-one-out on the resulting log gives back the given split exactly.

There are no real timestamps in these files, only each user's order. Events get synthetic,
order-preserving times: ``ts = 2020-01-01T00:00:00Z + position days + user index ms``; only the
order within a user means anything (do not read gaps, weekdays or cross-user order from them).
The interactions come from reviews, so each one is a ``purchase`` event; ids are the raw user ids
and raw item ids (ASINs) from the ``*2index`` files.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from infra.cli import UserError
from producers.importers.common import (
    Dataset,
    ImportReport,
    ItemDraft,
    build,
    require_dir,
    split_title,
    write_dataset,
)
from schemas.events import BehaviorEvent

#: 2020-01-01T00:00:00Z in ms: the synthetic time of every user's first interaction.
BASE_TS = 1_577_836_800_000
DAY_MS = 86_400_000
INTER_COLUMNS = ("user_id:token", "item_id_list:token_seq", "item_id:token")
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class InterRow:
    """One row of a ``.inter`` file, ids already mapped back to raw ids."""

    user: str
    history: tuple[str, ...]
    target: str
    line: int


def _lines(path: Path, header: bool = True) -> list[tuple[int, list[str]]]:
    """(line number, tab-separated fields) of every non-blank line (after the header, if any)."""
    first = 2 if header else 1
    try:
        with path.open(encoding="utf-8") as handle:
            return [
                (number, line.rstrip("\r\n").split("\t"))
                for number, line in enumerate(handle, start=1)
                if line.strip() and number >= first
            ]
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason})") from None


def _header(path: Path) -> list[str]:
    with path.open(encoding="utf-8", errors="replace") as handle:
        return handle.readline().rstrip("\r\n").split("\t")


def _index(path: Path) -> dict[str, tuple[str, int]]:
    """A ``*2index`` file inverted: index token -> (raw id, index)."""
    inverse: dict[str, tuple[str, int]] = {}
    for number, fields in _lines(path, header=False):
        if len(fields) != 2 or not fields[1].strip().isdigit():
            raise UserError(f"{path}:{number}: expected 'raw id<TAB>index'")
        inverse[fields[1].strip()] = (fields[0], int(fields[1]))
    return inverse


def _raw(token: str, mapping: dict[str, tuple[str, int]] | None, where: str, kind: str) -> str:
    if mapping is None:
        return token
    found = mapping.get(token)
    if found is None:
        raise UserError(f"{where}: {kind} index {token} is not in the {kind}2index file")
    return found[0]


def _read_inter(
    path: Path,
    users: dict[str, tuple[str, int]] | None,
    items: dict[str, tuple[str, int]] | None,
) -> list[InterRow]:
    header = [name.strip() for name in _header(path)]
    if tuple(header[:3]) != INTER_COLUMNS:
        raise UserError(
            f"{path}: header must be {' '.join(INTER_COLUMNS)} (tab-separated), "
            f"found {' '.join(header)[:80]}"
        )
    rows = []
    for number, fields in _lines(path):
        where = f"{path}:{number}"
        if len(fields) < 3 or not fields[0].strip() or not fields[2].strip():
            raise UserError(f"{where}: expected user, item list and item separated by tabs")
        rows.append(
            InterRow(
                user=_raw(fields[0].strip(), users, where, "user"),
                history=tuple(_raw(t, items, where, "item") for t in fields[1].split()),
                target=_raw(fields[2].strip(), items, where, "item"),
                line=number,
            )
        )
    return rows


def _chain(rows: list[InterRow], limit: int, path: Path) -> list[str]:
    """One user's train rows chained into their sequence (see the module docstring)."""
    by_history: dict[tuple[str, ...], InterRow] = {}
    for row in rows:
        if row.history in by_history:
            raise UserError(f"{path}:{row.line}: user {row.user} has two rows with this history")
        by_history[row.history] = row
    first = min(rows, key=lambda row: (len(row.history), row.line))
    del by_history[first.history]
    sequence = [*first.history, first.target]
    while (window := tuple(sequence[-limit:])) in by_history:
        sequence.append(by_history.pop(window).target)
    if by_history:
        rest = [row.line for row in by_history.values()]
        raise UserError(
            f"{path}: train rows of user {first.user} do not form one sequence "
            f"({len(by_history)} rows left over, e.g. line {min(rest)})"
        )
    return sequence


def _extend(sequence: list[str], row: InterRow, limit: int, path: Path) -> list[str]:
    """The sequence with a valid/test row's target, after checking the row's history fits."""
    if not sequence:
        return [*row.history, row.target]
    if tuple(sequence[-limit:]) != row.history:
        raise UserError(
            f"{path}:{row.line}: the history of user {row.user} does not match the items "
            "before it in the earlier splits"
        )
    return [*sequence, row.target]


def _one_per_user(rows: list[InterRow], path: Path) -> dict[str, InterRow]:
    by_user: dict[str, InterRow] = {}
    for row in rows:
        if row.user in by_user:
            raise UserError(f"{path}:{row.line}: user {row.user} has a second row in this split")
        by_user[row.user] = row
    return by_user


def _files(src: Path) -> tuple[str, dict[str, Path]]:
    require_dir(src, "RecBole dataset directory")
    trains = sorted(src.glob("*.train.inter"))
    if not trains:
        raise UserError(
            f"{src}: no *.train.inter file; a RecBole dataset directory holds "
            "NAME.train.inter, NAME.valid.inter and NAME.test.inter"
        )
    if len(trains) > 1:
        raise UserError(f"{src}: several datasets ({', '.join(p.name for p in trains)}); pick one")
    name = trains[0].name.removesuffix(".train.inter")
    paths = {split: src / f"{name}.{split}.inter" for split in SPLITS}
    for path in paths.values():
        if not path.is_file():
            raise UserError(f"{path}: missing; the dataset needs train, valid and test splits")
    return name, paths


def sequences(src: Path) -> tuple[str, dict[str, list[str]], dict[str, int], list[str]]:
    """(dataset name, raw user -> full item sequence, user -> index, catalogue item ids)."""
    name, paths = _files(src)
    user_map = (
        _index(src / f"{name}.user2index") if (src / f"{name}.user2index").is_file() else None
    )
    item_map = (
        _index(src / f"{name}.item2index") if (src / f"{name}.item2index").is_file() else None
    )
    splits = {split: _read_inter(path, user_map, item_map) for split, path in paths.items()}
    limit = max((len(r.history) for rows in splits.values() for r in rows), default=1) or 1
    train: dict[str, list[InterRow]] = defaultdict(list)
    for row in splits["train"]:
        train[row.user].append(row)
    valid = _one_per_user(splits["valid"], paths["valid"])
    test = _one_per_user(splits["test"], paths["test"])
    user_index = dict(user_map.values()) if user_map is not None else {}
    result: dict[str, list[str]] = {}
    for user in dict.fromkeys(r.user for rows in splits.values() for r in rows):
        sequence = _chain(train[user], limit, paths["train"]) if user in train else []
        if user in valid:
            sequence = _extend(sequence, valid[user], limit, paths["valid"])
        if user in test:
            sequence = _extend(sequence, test[user], limit, paths["test"])
        result[user] = sequence
        user_index.setdefault(user, len(user_index))
    order = sorted(result, key=lambda user: user_index[user])
    catalogue = [raw for raw, _ in item_map.values()] if item_map is not None else []
    return name, {user: result[user] for user in order}, user_index, catalogue


def _item_texts(path: Path) -> dict[str, str]:
    header = _header(path)
    if [h.strip() for h in header[:2]] != ["item_id:token", "text:token_seq"]:
        raise UserError(f"{path}: header must be item_id:token<TAB>text:token_seq")
    texts = {}
    for number, fields in _lines(path):
        if len(fields) < 2 or not fields[0].strip():
            raise UserError(f"{path}:{number}: expected an item id and its text separated by a tab")
        texts[fields[0].strip()] = "\t".join(fields[1:]).strip()
    return texts


def read_recbole(src: Path) -> Dataset:
    """A RecBole atomic dataset directory as purchase events in order, and its catalogue."""
    name, by_user, user_index, catalogue = sequences(src)
    source = f"recbole:{name}"
    events = []
    for user, sequence in by_user.items():
        for position, item in enumerate(sequence):
            events.append(
                build(
                    BehaviorEvent,
                    f"{src}: user {user}",
                    event_id=f"{source}:purchase:{user}:{item}:{position}",
                    ts=BASE_TS + position * DAY_MS + user_index[user],
                    type="purchase",
                    source=source,
                    user_id=user,
                    item_id=item,
                )
            )
    text_path = src / f"{name}.text"
    texts = _item_texts(text_path) if text_path.is_file() else {}
    items: dict[str, ItemDraft] = {}
    for item in [*catalogue, *texts, *(event.item_id for event in events)]:
        if item not in items:
            title, description = split_title(texts.get(item, ""), fallback=item)
            items[item] = ItemDraft(title=title, description=description)
    return Dataset(source=source, events=events, items=items)


def import_recbole(src: Path, out: Path, item_text: Path | None = None) -> ImportReport:
    """Import a RecBole atomic dataset directory into the event log ``out``."""
    started = time.perf_counter()
    return write_dataset(read_recbole(src), out, item_text, started)
