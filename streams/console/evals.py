"""The evaluation page's runs: every ``recstream eval --out DIR`` result under the eval directory.

A run is a folder holding the ``results.json`` that :func:`models.evaluation.report.write_results`
writes, with its plots beside it. Runs are looked for up to :data:`MAX_DEPTH` folders down and
listed newest first; their files are served only from inside the eval directory.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

MAX_DEPTH = 3
#: What the page may fetch from a run's folder.
SERVED_SUFFIXES = frozenset({".png", ".md", ".json"})
FILES_PREFIX = "/eval-files/"


def find_runs(eval_dir: Path) -> list[dict[str, Any]]:
    """Every readable run under ``eval_dir``, newest first (by its results.json's time)."""
    if not eval_dir.is_dir():
        return []
    found: list[tuple[float, dict[str, Any]]] = []
    for depth in range(MAX_DEPTH + 1):
        for results in eval_dir.glob("/".join(["*"] * depth + ["results.json"])):
            run = _load(eval_dir, results)
            if run is not None:
                found.append((results.stat().st_mtime, run))
    found.sort(key=lambda pair: pair[0], reverse=True)
    return [run for _, run in found]


def _load(root: Path, results: Path) -> dict[str, Any] | None:
    try:
        body = json.loads(results.read_text(encoding="utf-8"))
        models = body["models"]
        if not isinstance(models, dict):
            raise TypeError("models is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("eval_results_unreadable", path=str(results), error=str(exc))
        return None
    folder = results.parent
    run_id = folder.relative_to(root).as_posix()
    run_id = root.name if run_id == "." else run_id
    prefix = FILES_PREFIX + ("" if folder == root else folder.relative_to(root).as_posix() + "/")
    modified = datetime.fromtimestamp(results.stat().st_mtime, UTC)
    return {
        "id": run_id,
        "dataset": body.get("dataset", ""),
        "protocol": body.get("protocol", ""),
        "ks": body.get("ks", []),
        "command": body.get("command"),
        "modified": modified.isoformat(timespec="seconds"),
        "models": models,
        "slices": body.get("slices") or {},
        "mmr_sweep": body.get("mmr_sweep"),
        "plots": [prefix + png.name for png in sorted(folder.glob("*.png"))],
        "markdown": prefix + "results.md" if (folder / "results.md").is_file() else None,
    }


def served_file(eval_dir: Path, relative: str) -> Path | None:
    """The file ``relative`` names inside ``eval_dir``, or None if it is outside it, missing, or
    not a kind the page shows."""
    root = eval_dir.resolve()
    try:
        path = (root / relative).resolve()
    except (OSError, ValueError):
        return None
    if not path.is_relative_to(root) or path.suffix not in SERVED_SUFFIXES:
        return None
    return path if path.is_file() else None
