"""Archive compaction: rewrite the Parquet event log without the rows of forgotten users.

A user's ``forget_user`` row is their tombstone. Every other row about that user (behaviour,
reviews, recommendations, dead letters whose original bytes name them) with ``ts`` at or before the
latest forget is dropped; the forget rows stay, so a later compaction also drops redeliveries that
arrive after this one. Each file is rewritten atomically (a hidden temporary file, then a rename);
a file with nothing to drop is left untouched and a file left with no rows is removed.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import structlog

from schemas.eventlog import write_atomically

log = structlog.get_logger(__name__)

FORGET = "forget_user"
DEAD_LETTER = "dead_letter"


@dataclass
class CompactionReport:
    """What a compaction did: files read, rewritten and removed, rows dropped, users forgotten."""

    files: int = 0
    forgotten_users: int = 0
    rows_dropped: int = 0
    rewritten: list[Path] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)


def archive_files(archive_dir: Path) -> list[Path]:
    """The archive's Parquet files (hidden temporary files excluded), or why there are none."""
    if not archive_dir.exists():
        raise FileNotFoundError(f"archive directory not found: {archive_dir}")
    if not archive_dir.is_dir():
        raise NotADirectoryError(f"not a directory: {archive_dir}")
    files = sorted(p for p in archive_dir.glob("*.parquet") if not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"no .parquet files in {archive_dir}")
    return files


def forget_horizons(files: list[Path]) -> dict[str, int]:
    """For each user with a ``forget_user`` row in ``files``: the time of their latest forget."""
    scans = [
        pl.scan_parquet(path).select("type", "user_id", "ts").filter(pl.col("type") == FORGET)
        for path in files
    ]
    frame = (
        pl.concat(scans)
        .filter(pl.col("user_id").is_not_null())
        .group_by("user_id")
        .agg(pl.col("ts").max())
        .collect()
    )
    return dict(zip(frame["user_id"].to_list(), frame["ts"].to_list(), strict=True))


def payload_user(payload_b64: str | None) -> str | None:
    """The ``user_id`` named in a dead letter's original bytes, if they are a JSON object."""
    if not payload_b64:
        return None
    try:
        obj = json.loads(base64.b64decode(payload_b64, validate=True))
    except (ValueError, RecursionError):  # binascii, JSON and UTF-8 errors are ValueErrors
        return None
    user = obj.get("user_id") if isinstance(obj, dict) else None
    return user if isinstance(user, str) else None


def _subject(frame: pl.DataFrame) -> pl.Series:
    """Whose row each row is: its ``user_id``, or for a dead letter the user its bytes name."""
    if not frame["type"].eq(DEAD_LETTER).any():
        return frame["user_id"]
    named = [
        payload_user(payload) if kind == DEAD_LETTER else user
        for kind, user, payload in zip(
            frame["type"], frame["user_id"], frame["payload_b64"], strict=True
        )
    ]
    return pl.Series("subject", named, dtype=pl.String)


def forgotten_rows(frame: pl.DataFrame, horizons: dict[str, int]) -> pl.Series:
    """A mask of the rows to drop: not a forget, about a forgotten user, at or before the forget."""
    if frame.height == 0 or not horizons:
        return pl.Series("drop", [False] * frame.height, dtype=pl.Boolean)
    users, stamps = list(horizons), list(horizons.values())
    horizon = _subject(frame).replace_strict(users, stamps, default=None, return_dtype=pl.Int64)
    drop = (frame["type"] != FORGET) & horizon.is_not_null() & (frame["ts"] <= horizon)
    return drop.fill_null(False).alias("drop")


def compact_archive(archive_dir: Path) -> CompactionReport:
    """Drop, from every file of the archive in ``archive_dir``, the rows of forgotten users.

    Raises ``FileNotFoundError`` (no such directory, or no ``.parquet`` file in it),
    ``NotADirectoryError``, or polars' error for a file that cannot be read.
    """
    files = archive_files(archive_dir)
    horizons = forget_horizons(files)
    report = CompactionReport(files=len(files), forgotten_users=len(horizons))
    for path in files if horizons else []:
        frame = pl.read_parquet(path)
        drop = forgotten_rows(frame, horizons)
        dropped = int(drop.sum())
        if dropped == 0:
            continue
        report.rows_dropped += dropped
        if dropped == frame.height:
            path.unlink()
            report.removed.append(path)
        else:
            write_atomically(frame.filter(~drop), path)
            report.rewritten.append(path)
    log.info(
        "archive_compacted",
        dir=str(archive_dir),
        files=report.files,
        forgotten_users=report.forgotten_users,
        rows_dropped=report.rows_dropped,
        rewritten=len(report.rewritten),
        removed=len(report.removed),
    )
    return report
