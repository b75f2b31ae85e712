"""Qdrant Edge at 100,000 and 1,000,000 items: HNSW recall@10 against exact search, latency, build.

    python benchmarks/vector_scale.py --items 100000 --json OUT.json \\
        [--m 16,32 --ef-construct 100,200 --ef 32,64,128] [--queries 1000] [--base-texts N]

Vectors are all-MiniLM-L6-v2 vectors of real text, made by the project's encoder
(:class:`models.encoder.TextEncoder`, CPU, its default precision and a 256-token limit): the
Industrial & Scientific item texts and the Musical Instruments review texts under
``--data-dir``, read with the project's importers and de-duplicated. They are cached under
``--cache-dir`` (a .npy per text set and encoder), so re-runs skip encoding. ``--queries`` of them,
drawn at random, are held out as queries and never enter the index. The rest are all items, and
the set is filled up to ``--items`` with synthetic items, each the normalised sum of

- one real vector (the "primary", weight uniform in [0.5, 1]),
- one of the primary's 32 nearest real neighbours (weight uniform in [0, 0.5]),
- one other real vector at random (weight uniform in [0, 0.25]),
- Gaussian noise of expected norm 0.1,

so the set keeps MiniLM's anisotropic distribution and its topical clusters; the figures it prints
on the way (mean cosine of random pairs, cosine of each query's nearest item) show how close the
set stays to the real vectors.

Ground truth is the exact top-100 of every query by brute-force cosine (chunked float32 matmul).
For each ``(m, ef_construct)`` it builds a fresh :class:`EdgeVectorStore` in a temporary
directory and times the upserts and ``optimize()`` (Edge's HNSW build) apart. Before the first
``optimize()`` the one segment is plain, so the same store measures exact search there (on
``--exact-queries``): the comparison, in the same run. Then for each ``ef`` (the store reopened
with ``hnsw_ef``) it measures, on the held-out queries, with ``query_keys`` (keys and scores, the
call the recommender makes), each figure on a second pass over the queries:

- recall@10 and the latency of single-query calls (one vector per call, as one user's
  recommendation asks), p50/p99/max;
- queries/s in batches of ``--batch`` vectors;
- the recommender's own call: limit 100, filter ``available=true`` (recall@100, p50/p99).

Memory: the process RSS after the build and its growth per item; and what a fresh process holds
resident once it has opened the built shard and served the queries (``--probe``, a subprocess),
with the shard's bytes on disk (segments, WAL).

Run it under ``nice`` beside other work; it records the load average before and after.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infra.vectors import Filter, VectorPoint
from infra.vectors.edge import EdgeVectorStore
from producers.importers.amazon import read_amazon_reviews
from producers.importers.common import item_events
from producers.importers.recbole import read_recbole
from schemas.events import ReviewEvent

ROOT = Path(__file__).resolve().parents[1]
COLLECTION = "items"
K = 10
REC_LIMIT = 100  # the recommender's candidates (RECSTREAM_RANKING__CANDIDATES)
NEIGHBOURS = 32  # a synthetic item's second component is one of its primary's nearest reals
NOISE = 0.1  # expected norm of the noise added to each synthetic item
UPSERT_BATCH = 1000


def read_texts(data_dir: Path) -> list[tuple[str, str]]:
    """(source, text) of every item text of amazon-scientific and every review of
    amazon-instruments-2014, as the encoder would see them, exact duplicates dropped."""
    items = item_events(read_recbole(data_dir / "amazon-scientific"))
    reviews = read_amazon_reviews(data_dir / "amazon-instruments-2014/Musical_Instruments.json.gz")
    pairs = [("scientific-item", event.text()) for event in items if event.description]
    pairs += [
        ("instruments-review", event.text)
        for event in reviews.events
        if isinstance(event, ReviewEvent)
    ]
    first_source: dict[str, str] = {}
    for source, text in pairs:
        first_source.setdefault(text, source)
    return [(source, text) for text, source in first_source.items()]


def encoded(texts: Sequence[str], cache_dir: Path) -> tuple[np.ndarray, str]:
    """The MiniLM vectors of ``texts`` and the encoder's version, from the cache when present."""
    from models.encoder import packaged_model_dir, resolve_precision

    precision = resolve_precision("auto", "cpu")
    key = hashlib.sha256(
        "\0".join([str(packaged_model_dir()), precision, *texts]).encode()
    ).hexdigest()[:16]
    cached, meta = cache_dir / f"vector-scale-{key}.npy", cache_dir / f"vector-scale-{key}.json"
    if cached.is_file() and meta.is_file():
        progress(f"real vectors from {cached}")
        return np.load(cached), json.loads(meta.read_text())["encoder"]
    from models.encoder import TextEncoder

    encoder = TextEncoder(device="cpu", max_length=256, batch_size=64, precision="auto")
    order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths batch together
    out = np.empty((len(texts), encoder.dim), dtype=np.float32)
    started = time.perf_counter()
    for done in range(0, len(texts), 1024):
        rows = order[done : done + 1024]
        out[rows] = encoder.encode([texts[i] for i in rows])
        rate = (done + len(rows)) / (time.perf_counter() - started)
        eta = (len(texts) - done - len(rows)) / rate
        progress(
            f"encoded {done + len(rows):,}/{len(texts):,}, {rate:.0f} texts/s, ETA {eta:.0f} s"
        )
    encoder.close()
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(cached, out)
    meta.write_text(json.dumps({"encoder": encoder.version, "texts": len(texts)}))
    return out, encoder.version


def top_k(data: np.ndarray, queries: np.ndarray, k: int, chunk: int = 50_000) -> np.ndarray:
    """Row i: the indices of the ``k`` rows of ``data`` most cosine-similar to query i, best
    first (both sides unit vectors; chunked so a million rows never meet all queries at once)."""
    best_idx = np.zeros((len(queries), 0), dtype=np.int64)
    best_sim = np.zeros((len(queries), 0), dtype=np.float32)
    for start in range(0, len(data), chunk):
        sims = queries @ data[start : start + chunk].T
        part = np.argpartition(-sims, min(k, sims.shape[1] - 1), axis=1)[:, :k]
        best_idx = np.hstack([best_idx, part + start])
        best_sim = np.hstack([best_sim, np.take_along_axis(sims, part, axis=1)])
        keep = np.argsort(-best_sim, axis=1, kind="stable")[:, :k]
        best_idx = np.take_along_axis(best_idx, keep, axis=1)
        best_sim = np.take_along_axis(best_sim, keep, axis=1)
    return best_idx


def synthesize(base: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` unit vectors: every real vector of ``base`` (or ``n`` of them), then mixtures."""
    if n <= len(base):
        return base[rng.permutation(len(base))[:n]].copy()
    near = np.vstack(
        [top_k(base, base[s : s + 2048], NEIGHBOURS + 1)[:, 1:] for s in range(0, len(base), 2048)]
    )
    out = np.empty((n, base.shape[1]), dtype=np.float32)
    out[: len(base)] = base
    for start in range(len(base), n, 100_000):
        m = min(100_000, n - start)
        primary = rng.integers(0, len(base), m)
        second = near[primary, rng.integers(0, NEIGHBOURS, m)]
        third = rng.integers(0, len(base), m)
        mix = rng.uniform(0.5, 1.0, (m, 1)).astype(np.float32) * base[primary]
        mix += rng.uniform(0.0, 0.5, (m, 1)).astype(np.float32) * base[second]
        mix += rng.uniform(0.0, 0.25, (m, 1)).astype(np.float32) * base[third]
        noise = rng.standard_normal(mix.shape, dtype=np.float32)
        mix += noise * np.float32(NOISE / np.sqrt(base.shape[1]))
        out[start : start + m] = mix / np.linalg.norm(mix, axis=1, keepdims=True)
    return out


def shape_stats(real: np.ndarray, data: np.ndarray, queries: np.ndarray, truth: np.ndarray) -> dict:
    """How the set compares with real MiniLM vectors: mean cosine of random pairs (anisotropy),
    and the cosine of each query's nearest and 10th-nearest item, among all items and among the
    real ones alone."""
    rng = np.random.default_rng(5)

    def pairs(x: np.ndarray) -> float:
        a, b = rng.integers(0, len(x), (2, 20_000))
        return round(float(np.mean(np.sum(x[a] * x[b], axis=1))), 4)

    def mean_cosine(x: np.ndarray, rows: np.ndarray) -> float:
        return round(float(np.mean(np.sum(queries * x[rows], axis=1))), 4)

    real_truth = top_k(real, queries, K)
    return {
        "mean_pair_cosine_real": pairs(real),
        "mean_pair_cosine_items": pairs(data),
        "query_top1_cosine_mean": mean_cosine(data, truth[:, 0]),
        "query_top10_cosine_mean": mean_cosine(data, truth[:, K - 1]),
        "query_top1_cosine_mean_real_items": mean_cosine(real, real_truth[:, 0]),
        "query_top10_cosine_mean_real_items": mean_cosine(real, real_truth[:, K - 1]),
    }


def upsert_all(store: EdgeVectorStore, data: np.ndarray) -> float:
    """Upsert every row as item ``v<i>`` (available), in batches; seconds taken."""
    started, step = time.perf_counter(), max(len(data) // 10, UPSERT_BATCH)
    for start in range(0, len(data), UPSERT_BATCH):
        rows = range(start, min(start + UPSERT_BATCH, len(data)))
        store.upsert(COLLECTION, [VectorPoint(f"v{i}", data[i], {"available": True}) for i in rows])
        if rows.stop % step < UPSERT_BATCH or rows.stop == len(data):
            rate = rows.stop / (time.perf_counter() - started)
            progress(
                f"  upserted {rows.stop:,}/{len(data):,}, {rate:,.0f} items/s, "
                f"ETA {(len(data) - rows.stop) / rate:.0f} s"
            )
    return time.perf_counter() - started


def searched(
    store: EdgeVectorStore, queries: np.ndarray, truth: np.ndarray, limit: int, rec: bool = False
) -> dict[str, Any]:
    """Recall@``limit`` and latency (ms) of one ``query_keys`` call per query, timed on a
    second pass, as a long-running worker sees it (the first warms Edge and the store's
    id -> key table)."""
    flt = Filter(must_equal={"available": True}) if rec else None
    for query in queries:
        store.query_keys(COLLECTION, [query], limit, flt)
    times, found = [], 0
    for query, expected in zip(queries, truth[:, :limit], strict=True):
        began = time.perf_counter()
        [scores] = store.query_keys(COLLECTION, [query], limit, flt)
        times.append((time.perf_counter() - began) * 1000)
        found += len({int(key[1:]) for key in scores} & set(expected.tolist()))
    p50, p99 = np.percentile(times, [50, 99])
    return {
        f"recall_at_{limit}": round(found / truth[:, :limit].size, 4),
        "p50_ms": round(float(p50), 3),
        "p99_ms": round(float(p99), 3),
        "max_ms": round(max(times), 3),
    }


def batched_rate(store: EdgeVectorStore, queries: np.ndarray, batch: int) -> float:
    """Queries per second, ``batch`` vectors per ``query_keys`` call."""
    started = time.perf_counter()
    for start in range(0, len(queries), batch):
        store.query_keys(COLLECTION, list(queries[start : start + batch]), K)
    return round(len(queries) / (time.perf_counter() - started), 1)


def measure(
    store: EdgeVectorStore, queries: np.ndarray, truth: np.ndarray, batch: int
) -> dict[str, Any]:
    """Top-10 single-query figures, batched throughput, and the recommender-shaped call."""
    row = searched(store, queries, truth, K)
    row[f"batch{batch}_queries_per_s"] = batched_rate(store, queries, batch)
    rec = searched(store, queries, truth, REC_LIMIT, rec=True)
    row.update({f"rec_{name}": value for name, value in rec.items()})
    return row


def build_and_search(
    args: argparse.Namespace,
    data: np.ndarray,
    queries: np.ndarray,
    truth: np.ndarray,
    *,
    hnsw: tuple[int, int],
    exact: bool,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One (m, ef_construct) build with its searches at every ef; plus exact search if asked."""
    few = args.exact_queries
    with tempfile.TemporaryDirectory(prefix="vector-scale-", dir=args.workdir) as tmp:
        path = Path(tmp) / "qdrant"
        exact_on = (queries[:few], truth[:few]) if exact else None
        build, exact_row = built(path, data, hnsw, exact_on, args.batch)
        for ef in args.ef:
            store = EdgeVectorStore(path, hnsw_ef=ef)
            row = {"ef": ef, **measure(store, queries, truth, args.batch)}
            store.close()
            build["searches"].append(row)
            progress(f"  ef={ef}: recall@10 {row['recall_at_10']}, p99 {row['p99_ms']} ms")
        build["serving_memory"] = serving_memory(path, queries, max(args.ef))
    return build, exact_row


def built(
    path: Path,
    data: np.ndarray,
    hnsw: tuple[int, int],
    exact_on: tuple[np.ndarray, np.ndarray] | None,
    batch: int,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Upserts then ``optimize()``, timed apart; exact search on the plain segment in between
    when ``exact_on`` holds queries and their truth."""
    m, ef_construct = hnsw
    before = memory()
    store = EdgeVectorStore(path, hnsw_m=m, hnsw_ef_construct=ef_construct)
    store.ensure_collection(COLLECTION, data.shape[1])
    progress(f"build m={m} ef_construct={ef_construct}")
    upsert_s = upsert_all(store, data)
    exact_row = None
    if exact_on is not None:
        progress(f"  exact search (plain segment) on {len(exact_on[0])} queries")
        exact_row = measure(store, *exact_on, batch)
    progress("  optimize (HNSW build) ...")
    began = time.perf_counter()
    store.optimize(COLLECTION)
    optimize_s = time.perf_counter() - began
    after = memory()
    store.close()
    progress(f"  upserts {upsert_s:.1f} s, optimize {optimize_s:.1f} s")
    shard = path / COLLECTION
    return {
        "m": m,
        "ef_construct": ef_construct,
        "upsert_s": round(upsert_s, 2),
        "optimize_s": round(optimize_s, 2),
        "segments": len(list((shard / "segments").iterdir())),
        "memory_after_build": after,
        "rss_added_bytes_per_item": round((after["VmRSS"] - before["VmRSS"]) / len(data), 1),
        "disk_bytes": {
            "segments": disk_bytes(shard / "segments"),
            "wal": disk_bytes(shard / "wal"),
            "total": disk_bytes(path),
        },
        "searches": [],
    }, exact_row


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident memory (or another /proc/self/status field), in bytes."""
    status = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", status, re.M)
    return int(match.group(1)) * 1024 if match else 0


def memory() -> dict[str, int]:
    """Resident memory in bytes: all, anonymous (heaps) and file-backed (mapped shard files)."""
    return {field: rss_bytes(field) for field in ("VmRSS", "RssAnon", "RssFile")}


def disk_bytes(path: Path) -> int:
    """Bytes allocated on disk under ``path`` (sparse and preallocated files as they are)."""
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


def serving_memory(path: Path, queries: np.ndarray, ef: int) -> dict[str, int]:
    """What a fresh process holds resident to serve the shard at ``path``: it opens the store and
    runs ``queries`` at top-10 and as the recommender asks; the growth over its state just before
    opening (``--probe``)."""
    np.save(path.parent / "queries.npy", queries)
    done = subprocess.run(
        [sys.executable, __file__, "--probe", str(path), "--ef", str(ef)],
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(done.stdout))


def probe(path: Path, ef: int) -> dict[str, int]:
    import qdrant_edge  # noqa: F401 - its library is mapped before the baseline, not counted

    queries = np.load(path.parent / "queries.npy")
    before = memory()
    store = EdgeVectorStore(path, hnsw_ef=ef)
    rec = Filter(must_equal={"available": True})
    for query in queries:
        store.query_keys(COLLECTION, [query], K)
        store.query_keys(COLLECTION, [query], REC_LIMIT, rec)
    after = memory()
    store.close()
    return {field: after[field] - before[field] for field in after}


def machine() -> dict[str, Any]:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = re.search(r"^model name\s*:\s*(.*)$", info, re.M)
    mem = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu.group(1) if cpu else platform.processor(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": int(mem.group(1)) * 1024 if mem else None,
        "qdrant_edge": version("qdrant-edge-py"),
        "numpy": np.__version__,
        "nice": os.nice(0),
    }


def choose(builds: list[dict[str, Any]], recall: float, p99_ms: float) -> dict[str, Any] | None:
    """The smallest (m, ef_construct, ef) whose recall@10 and single-query p99 meet the target."""
    meeting = [
        {"m": b["m"], "ef_construct": b["ef_construct"], **s}
        for b in builds
        for s in b["searches"]
        if s["recall_at_10"] >= recall and s["p99_ms"] <= p99_ms
    ]
    return min(meeting, key=lambda r: (r["m"], r["ef_construct"], r["ef"]), default=None)


def table(r: dict[str, Any]) -> str:
    batch, shape = f"batch{r['batch']}_queries_per_s", r["shape"]
    head = (
        f"{'m':>3} {'efc':>4} {'ef':>5} {'recall@10':>9} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'max ms':>7} {'batch q/s':>9}  {'rec@100':>7} {'p50 ms':>7} {'p99 ms':>7}"
    )

    def line(m: Any, efc: Any, ef: Any, s: dict[str, Any]) -> str:
        return (
            f"{m:>3} {efc:>4} {ef:>5} {s['recall_at_10']:>9.4f} {s['p50_ms']:>7.2f} "
            f"{s['p99_ms']:>7.2f} {s['max_ms']:>7.2f} {s[batch]:>9,.0f}  "
            f"{s['rec_recall_at_100']:>7.4f} {s['rec_p50_ms']:>7.2f} {s['rec_p99_ms']:>7.2f}"
        )

    out = [
        f"Qdrant Edge, {r['items']:,} MiniLM-shaped items ({r['vectors']['real_in_index']:,} real),"
        f" {r['queries']:,} held-out real queries, {r['machine']['cpu_count']} cores",
        f"mean cosine of random pairs: real {shape['mean_pair_cosine_real']}, items "
        f"{shape['mean_pair_cosine_items']}; query to its nearest item "
        f"{shape['query_top1_cosine_mean']} (real items only "
        f"{shape['query_top1_cosine_mean_real_items']}), to its 10th "
        f"{shape['query_top10_cosine_mean']} ({shape['query_top10_cosine_mean_real_items']})",
        head,
        line("-", "-", "exact", r["exact"]) + f"   ({r['exact_queries']} queries, plain segment)",
    ]
    out += [line(b["m"], b["ef_construct"], s["ef"], s) for b in r["builds"] for s in b["searches"]]
    out += [
        "",
        f"{'m':>3} {'efc':>4} {'upsert s':>9} {'optimize s':>10} {'segments':>8} "
        f"{'RSS MiB':>8} {'B/item':>7} {'serve MiB':>9} {'B/item':>7} {'disk MiB':>8} "
        f"{'WAL MiB':>8}",
    ]
    out += [
        f"{b['m']:>3} {b['ef_construct']:>4} {b['upsert_s']:>9.1f} {b['optimize_s']:>10.1f} "
        f"{b['segments']:>8} {b['memory_after_build']['VmRSS'] / 2**20:>8,.0f} "
        f"{b['rss_added_bytes_per_item']:>7,.0f} "
        f"{b['serving_memory']['VmRSS'] / 2**20:>9,.0f} "
        f"{b['serving_memory']['VmRSS'] / r['items']:>7,.0f} "
        f"{b['disk_bytes']['segments'] / 2**20:>8,.0f} {b['disk_bytes']['wal'] / 2**20:>8,.0f}"
        for b in r["builds"]
    ]
    chosen = r["chosen"]
    out.append(
        "smallest meeting the target: "
        + (
            f"m={chosen['m']} ef_construct={chosen['ef_construct']} ef={chosen['ef']}"
            if chosen
            else "none"
        )
    )
    return "\n".join(out)


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vector_scale.py", description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000, help="held-out real queries")
    parser.add_argument("--exact-queries", type=int, default=None, help="default: --queries")
    parser.add_argument("--base-texts", type=int, help="at most this many real texts")
    parser.add_argument("--m", type=ints, default=[16], help="comma-separated")
    parser.add_argument("--ef-construct", type=ints, default=[100], help="comma-separated")
    parser.add_argument("--ef", type=ints, default=[32, 64, 128], help="comma-separated")
    parser.add_argument("--batch", type=int, default=32, help="vectors per batched call")
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--target-p99-ms", type=float, default=5.0)
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared/data")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "bench-out")
    parser.add_argument("--workdir", type=Path, help="where the shards go (default: the tmp dir)")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--probe", type=Path, help=argparse.SUPPRESS)  # see serving_memory()
    args = parser.parse_args(argv)
    if args.json is not None and not args.json.parent.is_dir():
        parser.error(f"--json: no such directory: {args.json.parent}")
    args.exact_queries = min(args.exact_queries or args.queries, args.queries)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.probe is not None:
        print(json.dumps(probe(args.probe, args.ef[0])))
        return 0
    started = datetime.now(UTC).isoformat(timespec="seconds")
    load_before = os.getloadavg()
    rng = np.random.default_rng(args.seed)
    pairs = read_texts(args.data_dir)
    if args.base_texts and args.base_texts < len(pairs):
        pairs = [pairs[i] for i in sorted(rng.permutation(len(pairs))[: args.base_texts])]
    real, encoder_version = encoded([t for _, t in pairs], args.cache_dir)
    held = rng.permutation(len(real))
    queries, base = real[held[: args.queries]], real[held[args.queries :]]
    data = synthesize(base, args.items, rng)
    progress(f"{len(data):,} items ({min(len(base), len(data)):,} real), finding exact top-100")
    truth = top_k(data, queries, REC_LIMIT)
    builds, exact = [], None
    for n, hnsw in enumerate((m, efc) for m in args.m for efc in args.ef_construct):
        build, exact_row = build_and_search(args, data, queries, truth, hnsw=hnsw, exact=n == 0)
        builds.append(build)
        exact = exact or exact_row
    sources = dict(Counter(source for source, _ in pairs))
    result = {
        "machine": machine(),
        "command": list(sys.argv),
        "started": started,
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "items": len(data),
        "queries": len(queries),
        "exact_queries": args.exact_queries,
        "batch": args.batch,
        "vectors": vector_info(sources, encoder_version, len(base), len(data), args.seed),
        "shape": shape_stats(base, data, queries, truth),
        "exact": exact,
        "builds": builds,
        "peak_rss_bytes": rss_bytes("VmHWM"),
        "target": {"recall_at_10": args.target_recall, "p99_ms": args.target_p99_ms},
        "chosen": choose(builds, args.target_recall, args.target_p99_ms),
    }
    print(table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def vector_info(
    sources: dict[str, int], encoder: str, real_base: int, items: int, seed: int
) -> dict[str, Any]:
    return {
        "how": (
            "MiniLM vectors of real texts (sources), encoded by models.encoder.TextEncoder on "
            "the CPU; the held-out queries are real vectors not in the index; items are the "
            "remaining real vectors plus synthetic ones, each the normalised sum of a random "
            "real vector (weight U[0.5,1]), one of its 32 nearest real neighbours (U[0,0.5]), "
            "another random real vector (U[0,0.25]) and Gaussian noise of norm ~0.1"
        ),
        "sources": sources,
        "encoder": encoder,
        "real_in_index": min(real_base, items),
        "synthetic": max(items - real_base, 0),
        "seed": seed,
    }


if __name__ == "__main__":
    from infra.cli import UserError

    try:
        sys.exit(main())
    except UserError as exc:  # a missing dataset: one line, no traceback
        sys.exit(f"error: {exc}")
