"""Bytes of state per user and per item, measured, and projected to a million of each.

    python benchmarks/memory.py --json OUT.json                      # synthetic users and items
    python benchmarks/memory.py --log sci.parquet --json OUT.json    # users from a real event log

Users go through the recommend step's own table writes (``UserStateStep.absorb``, no ranking):

- **synthetic**: ``--users`` users with ``--events`` behaviour events each, drawn like
  ``benchmarks/e2e.py``'s load (two favourite topics per user), plus the same number of users
  with a full history (``recent_items`` interactions);
- **log**: every behaviour event and review of an event log, in time order.

For each it reports the table value's size at rest (the JSON bytes the changelog and an on-disk
store hold, key included) and the Python heap the in-memory table holds per user (tracemalloc),
and beside them, measured in the same run, the same states serialised the way a naive
implementation would (``dataclasses.asdict`` and ``json.dumps`` with default separators).

Items: the co-visitation table's entry per item (after the same load), the ranker's cached
item record (vector and payload, :class:`~infra.vectors.cached.CachedStore`) and Qdrant Edge's
bytes on disk and resident growth per item for ``--items`` MiniLM-shaped (384-d) vectors.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import random
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np

from infra.settings import Settings
from infra.vectors import VectorPoint
from infra.vectors.cached import CachedStore
from infra.vectors.edge import EdgeVectorStore
from models.state import UserState
from schemas.internal import UserUpdate
from streams.sinks import Sinks
from streams.user_state import Tables, UserStateStep

MIB = 1024 * 1024
MILLION = 1_000_000
DIM = 384


def rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def allocated(root: Path) -> int:
    """Bytes of disk the files under ``root`` occupy (blocks, so preallocated space that holds
    nothing is not counted; Edge sizes some files ahead of their contents)."""
    return sum(f.stat().st_blocks * 512 for f in root.rglob("*") if f.is_file())


def heap_of(build: Callable[[], object]) -> tuple[object, int]:
    """What ``build`` returns and the Python heap it still holds (tracemalloc)."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    built = build()
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return built, after - before


def json_bytes(key: str, value: Any) -> int:
    """A table record at rest: key and compact JSON value, as the changelog carries them."""
    return len(key.encode()) + len(json.dumps(value, separators=(",", ":")).encode())


def naive_bytes(key: str, state: UserState) -> int:
    """The same state serialised with ``asdict`` and default ``json.dumps`` separators."""
    return len(key.encode()) + len(json.dumps(dataclasses.asdict(state)).encode())


def synthetic_updates(
    users: int, events: int, items: int, seed: int, prefix: str
) -> list[UserUpdate]:
    """``events`` behaviour events for each of ``users`` users, interleaved, e2e-style."""
    from e2e import KINDS, TOPICS

    rng = random.Random(seed)
    topics = len(TOPICS)
    favourite = {u: (rng.randrange(topics), rng.randrange(topics)) for u in range(users)}
    out = []
    for n in range(users * events):
        user = n % users
        topic = rng.choice(favourite[user])
        item = topic + topics * rng.randrange(max(items // topics, 1))
        out.append(
            UserUpdate(
                event_id=f"{prefix}-{n:08d}",
                ts=1_700_000_000_000 + n * 1000,
                received_ms=0,
                kind="behavior",
                user_id=f"{prefix}-user-{user:06d}",
                event_type=rng.choice(KINDS),
                item_id=f"item-{item:06d}",
            )
        )
    return out


def log_updates(path: Path) -> list[UserUpdate]:
    """The behaviour events and reviews of an event log, in time order, as user updates."""
    from producers.replay import ReplayReport, input_events, load_sorted_log
    from schemas.events import BehaviorEvent, ReviewEvent

    out = []
    for event in input_events(load_sorted_log(path), ReplayReport()):
        if isinstance(event, BehaviorEvent | ReviewEvent):
            out.append(
                UserUpdate(
                    event_id=event.event_id,
                    ts=event.ts,
                    received_ms=0,
                    kind="behavior",
                    user_id=event.user_id,
                    event_type="review" if isinstance(event, ReviewEvent) else event.type,
                    item_id=event.item_id,
                    value=getattr(event, "value", None),
                )
            )
    return out


def absorb_all(step: UserStateStep, updates: Sequence[UserUpdate], batch: int = 500) -> None:
    for start in range(0, len(updates), batch):
        step.absorb(list(updates[start : start + batch]))


def user_figures(label: str, updates: Sequence[UserUpdate], max_recent: int) -> dict[str, Any]:
    """Per-user bytes of the table state these updates leave behind."""
    tables = Tables(users={}, covisit={}, popularity={})
    step = UserStateStep(
        tables=tables,
        recommender=None,  # type: ignore[arg-type]  # absorb never ranks
        store=None,  # type: ignore[arg-type]  # nor touches the store without a forget
        reviews_collection="reviews",
        sinks=Sinks({}),
        model_version="memory",
        max_recent=max_recent,
    )
    absorb_all(step, updates)
    users = tables.users
    count = len(users)

    def copy_table() -> dict[str, Any]:  # the heap of a table holding these values
        return {k: json.loads(json.dumps(v)) for k, v in users.items()}

    _, heap = heap_of(copy_table)
    at_rest = [json_bytes(k, v) for k, v in users.items()]
    naive = [naive_bytes(k, UserState.from_dict(v)) for k, v in users.items()]
    recents = [len(UserState.from_dict(v).recent) for v in users.values()]
    covisit_rest = [json_bytes(k, v) for k, v in tables.covisit.items()]

    def copy_covisit() -> dict[str, Any]:
        return {k: dict(v) for k, v in tables.covisit.items()}

    _, covisit_heap = heap_of(copy_covisit)
    return {
        "label": label,
        "users": count,
        "events": len(updates),
        "mean_recent_items": round(float(np.mean(recents)), 1),
        "at_rest_bytes_per_user": round(float(np.mean(at_rest)), 1),
        "at_rest_bytes_p99": int(np.percentile(at_rest, 99)),
        "naive_at_rest_bytes_per_user": round(float(np.mean(naive)), 1),
        "heap_bytes_per_user": round(heap / count, 1),
        "covisit_items": len(tables.covisit),
        "covisit_at_rest_bytes_per_item": round(float(np.mean(covisit_rest)), 1)
        if covisit_rest
        else 0.0,
        "covisit_heap_bytes_per_item": round(covisit_heap / max(len(tables.covisit), 1), 1),
        "covisit_mean_neighbours": round(
            float(np.mean([len(v) for v in tables.covisit.values()])), 1
        )
        if tables.covisit
        else 0.0,
    }


def item_figures(count: int, seed: int) -> dict[str, Any]:
    """Per-item bytes: Edge on disk and resident, and the ranker's cached item record."""
    from e2e import catalogue

    rng = np.random.default_rng(seed)
    texts = catalogue(count, random.Random(seed))
    vectors = rng.normal(size=(count, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with tempfile.TemporaryDirectory(prefix="recstream-memory-") as tmp:
        gc.collect()
        rss0 = rss_bytes()
        store = EdgeVectorStore(Path(tmp))
        store.ensure_collection("items", DIM)
        start = time.perf_counter()
        for lo in range(0, count, 1000):
            store.upsert(
                "items",
                [
                    VectorPoint(
                        item["item_id"],
                        vectors[lo + n],
                        {
                            "title": item["title"],
                            "categories": item["categories"],
                            "available": True,
                            "text_hash": "0" * 16,
                            "text_source": "catalogue",
                        },
                    )
                    for n, item in enumerate(texts[lo : lo + 1000])
                ],
            )
        load_s = time.perf_counter() - start
        store.close()  # flush, so the directory holds what a restart reads
        segments = allocated(Path(tmp) / "items" / "segments")
        wal = allocated(Path(tmp) / "items" / "wal")
        store = EdgeVectorStore(Path(tmp))
        store.count("items")
        rss_edge = rss_bytes() - rss0
        cache = CachedStore(store, "items", capacity=count)
        keys = [item["item_id"] for item in texts]

        def fill() -> int:
            for lo in range(0, count, 1000):
                cache.retrieve("items", keys[lo : lo + 1000])
            return len(cache)

        _, cache_heap = heap_of(fill)
        store.close()
    return {
        "items": count,
        "edge_segments_bytes_per_item": round(segments / count, 1),
        "edge_wal_bytes_per_item": round(wal / count, 1),
        "edge_resident_bytes_per_item": round(rss_edge / count, 1),
        "item_cache_heap_bytes_per_item": round(cache_heap / count, 1),
        "raw_vector_bytes": DIM * 4,
        "edge_load_s": round(load_s, 2),
    }


def project(users: dict[str, Any], items: dict[str, Any]) -> dict[str, float]:
    """GiB for a million users and a million items, from the per-unit figures."""
    gib = 1024**3
    return {
        "users_at_rest_gib": round(users["at_rest_bytes_per_user"] * MILLION / gib, 2),
        "users_heap_gib": round(users["heap_bytes_per_user"] * MILLION / gib, 2),
        "covisit_at_rest_gib": round(users["covisit_at_rest_bytes_per_item"] * MILLION / gib, 2),
        "covisit_heap_gib": round(users["covisit_heap_bytes_per_item"] * MILLION / gib, 2),
        "edge_segments_gib": round(
            items["edge_segments_bytes_per_item_marginal"] * MILLION / gib, 2
        ),
        "edge_resident_gib": round(
            items["edge_resident_bytes_per_item_marginal"] * MILLION / gib, 2
        ),
        "item_cache_heap_gib": round(items["item_cache_heap_bytes_per_item"] * MILLION / gib, 2),
    }


def table(result: dict[str, Any]) -> str:
    lines = ["recstream memory: bytes of state per user and per item", ""]
    lines.append(
        f"{'users':<34}{'users':>8}{'recent':>8}{'at rest':>9}{'naive':>9}{'heap':>9}"
        f"{'covisit rest':>14}{'covisit heap':>14}"
    )
    for u in result["user_runs"]:
        lines.append(
            f"{u['label']:<34}{u['users']:>8,}{u['mean_recent_items']:>8}"
            f"{u['at_rest_bytes_per_user']:>9,.0f}{u['naive_at_rest_bytes_per_user']:>9,.0f}"
            f"{u['heap_bytes_per_user']:>9,.0f}{u['covisit_at_rest_bytes_per_item']:>14,.0f}"
            f"{u['covisit_heap_bytes_per_item']:>14,.0f}"
        )
    it = result["items"]
    lines += [
        "",
        f"items ({it['items']:,}, {DIM}-d): Edge segments {it['edge_segments_bytes_per_item']:,.0f}"
        f" B and write-ahead log {it['edge_wal_bytes_per_item']:,.0f} B on disk, "
        f"Edge resident {it['edge_resident_bytes_per_item']:,.0f} B, item cache "
        f"{it['item_cache_heap_bytes_per_item']:,.0f} B per item (raw vector {DIM * 4} B); "
        f"from {it['items'] // 2:,} to {it['items']:,} items each further item took "
        f"{it['edge_segments_bytes_per_item_marginal']:,.0f} B of segments and "
        f"{it['edge_resident_bytes_per_item_marginal']:,.0f} B resident",
        "",
        "projected for 1M users and 1M items (first user run): "
        + ", ".join(f"{k} {v}" for k, v in result["projection"].items()),
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings()
    max_recent = settings.ranking.recent_items
    runs = []
    if args.log is not None:
        if not args.log.is_file():
            raise SystemExit(f"error: no event log at {args.log}")
        runs.append(user_figures(f"log {args.log.name}", log_updates(args.log), max_recent))
    typical = synthetic_updates(args.users, args.events, args.items, args.seed, "t")
    runs.append(user_figures(f"synthetic, {args.events} events/user", typical, max_recent))
    full = synthetic_updates(args.users, max_recent * 2, args.items, args.seed + 1, "f")
    runs.append(user_figures(f"synthetic, full ({max_recent} recent)", full, max_recent))
    half = item_figures(args.items // 2, args.seed)
    items = item_figures(args.items, args.seed)
    # Edge has fixed costs (buffers, preallocated files); the growth from half the items to all
    # of them is what each further item costs, and what the projection uses.
    for name in ("edge_segments_bytes_per_item", "edge_resident_bytes_per_item"):
        grown = items[name] * items["items"] - half[name] * half["items"]
        items[f"{name}_marginal"] = round(grown / (items["items"] - half["items"]), 1)
    return {
        "benchmark": "memory",
        "command": " ".join(["python", *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "user_runs": runs,
        "items": items,
        "projection": project(runs[0], items),
    }


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=20, help="events per synthetic user")
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--log", type=Path, help="an event log (Parquet) to take users from")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.users < 1 or args.events < 1 or args.items < 1:
        parser.error("--users, --events and --items must be at least 1")
    result = run(args)
    print(table(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
