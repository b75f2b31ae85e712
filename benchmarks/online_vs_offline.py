"""Online HR@K of a replay through the embedded stack beside offline prequential HR@K, same run.

The event log's catalogue is published first and embedded; then its interactions are replayed in
event-time order at a steady rate into a real worker (role ``all``), and ``eval-online``'s
evaluator judges each list the worker emitted by the user's next interaction. The same log then
goes through offline prequential evaluation of the production ranker (``recstream eval
--protocol prequential``'s code). Both use :mod:`schemas.scoring`; the difference between them is
what the stream does differently from one-event-at-a-time evaluation (batching, the encoder's
delay before a review's vector joins the user's state). The online report also counts the targets
judged by a list from before their previous event (the worker lists once per user per batch).

    python benchmarks/online_vs_offline.py LOG [--rate 40] [--limit N] [--k 10] [--json OUT]
                                           [--model-dir MODEL_DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import polars as pl

from consumers.online_eval import run_online_eval
from infra.broker import EmbeddedBroker
from infra.kafka import group_progress, provision_topics
from infra.logs import configure_logging
from infra.settings import Settings, load_settings
from models.evaluation.cli import build_models
from models.evaluation.data import load_dataset
from models.evaluation.metrics import summarize
from models.evaluation.protocols import run_prequential
from producers.producer import BehaviorProducer
from producers.replay import iter_rows, load_sorted_log
from schemas.eventlog import from_row
from schemas.topics import BEHAVIOR, ENCODE_REQUESTS, USER_UPDATES
from streams.spawn import spawn_worker, stop_process

GROUP = "recstream"


def _wait_committed(settings: Settings, topic: str, total: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            done, end = group_progress(settings.kafka, GROUP, topic)
        except Exception:  # noqa: BLE001 - the worker's group may not exist yet
            done, end = 0, 1
        if done >= max(total, end) > 0:
            return
        time.sleep(1.0)
    raise SystemExit(f"worker did not commit {total} messages of {topic} in {timeout_s:.0f} s")


def _publish(settings: Settings, rows: list[dict[str, Any]], rate: float | None) -> float:
    started = time.monotonic()
    with BehaviorProducer(settings, source="replay") as producer:
        for n, row in enumerate(rows):
            if rate:
                due = started + n / rate
                while (wait := due - time.monotonic()) > 0:
                    producer.poll(min(wait, 0.2))
            producer.send(from_row(row))
            if n % 1000 == 0:
                print(f"\rpublished {n:,}/{len(rows):,}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return time.monotonic() - started


def online(
    log: Path, rate: float, k: int, tmp: Path, *, model_dir: Path | None, from_ts: int | None
) -> dict[str, Any]:
    """Replay the log into a real worker and judge its lists online."""
    frame = load_sorted_log(log)
    items = [r for r in iter_rows(frame) if r["type"] == "item"]
    rest = [r for r in iter_rows(frame) if r["type"] != "item"]
    with EmbeddedBroker(log_file=tmp / "broker.log") as broker:
        settings = load_settings(
            data_dir=tmp / "data", kafka={"bootstrap_servers": broker.bootstrap_servers}
        )
        provision_topics(settings.kafka)
        serving = {"RECSTREAM_SERVING__MODEL_DIR": str(model_dir)} if model_dir else {}
        worker = spawn_worker(
            settings,
            tmp / "worker.log",
            RECSTREAM_STREAM__WEB_PORT="0",
            RECSTREAM_DEVICE="cpu",
            **serving,
        )
        try:
            _publish(settings, items, None)
            _wait_committed(settings, ENCODE_REQUESTS.name, len(items), 600)
            seconds = _publish(settings, rest, rate)
            reviews = sum(r["type"] == "review" for r in rest)
            _wait_committed(settings, BEHAVIOR.name, 0, 1800)  # the ingest hop is through
            _wait_committed(settings, ENCODE_REQUESTS.name, len(items) + reviews, 1800)
            # user updates travel several to a message: done at the topic's end
            _wait_committed(settings, USER_UPDATES.name, 0, 1800)
            report = run_online_eval(
                settings,
                k,
                window_s=10 * 365 * 86400,
                timeout_s=10.0,
                out=sys.stderr,
                score_from_ts=from_ts,
            )
        finally:
            stop_process(worker)
    report["replay_seconds"] = round(seconds, 1)
    report["replay_events_per_s"] = round(len(rest) / seconds, 1)
    return report


def offline(
    log: Path, k: int, tmp: Path, *, model_dir: Path | None, from_ts: int | None
) -> dict[str, Any]:
    """Offline prequential evaluation of the production ranker (or trained model) on the log."""
    settings = load_settings(data_dir=Path(".data"))
    data = load_dataset(log)
    name = "trained" if model_dir else "ranker"
    models = build_models([name], data, settings, k=k, workdir=tmp / "offline", model_dir=model_dir)
    (run,), popularity = run_prequential(data, models, k, score_from_ts=from_ts)
    return summarize(run, [k], catalogue=data.catalogue, item_vectors=None, popularity=popularity)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path)
    parser.add_argument("--rate", type=float, default=40.0, help="replayed events per second")
    parser.add_argument("--limit", type=int, default=None, help="only the first N events")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="serve this trained model (one trained with --holdout time on the log); only events "
        "from its trained_until_ts on are scored, online and offline",
    )
    args = parser.parse_args(argv)
    from_ts = None
    if args.model_dir is not None:
        from models.trained import read_manifest

        from_ts = read_manifest(args.model_dir)["holdout"]["trained_until_ts"]
    configure_logging("warning")
    with tempfile.TemporaryDirectory(prefix="recstream-online-") as tmp_name:
        tmp = Path(tmp_name)
        log = args.log
        if args.limit:
            log = tmp / "limited.parquet"
            load_sorted_log(args.log).head(args.limit).write_parquet(log)
        started = time.monotonic()
        got_online = online(log, args.rate, args.k, tmp, model_dir=args.model_dir, from_ts=from_ts)
        got_offline = offline(log, args.k, tmp, model_dir=args.model_dir, from_ts=from_ts)
    key = f"HR@{args.k}"
    on, off = got_online[key], got_offline[key]
    result = {
        "machine": {"platform": platform.platform(), "cpus": __import__("os").cpu_count()},
        "command": " ".join(["python", *sys.argv]),
        "log": str(args.log),
        "events_limit": args.limit,
        "rate": args.rate,
        "model_dir": str(args.model_dir) if args.model_dir else None,
        "scored_from_ts": from_ts,
        "online": got_online,
        "offline": got_offline,
        "relative_difference": abs(on - off) / off if off else None,
        "seconds": round(time.monotonic() - started, 1),
    }
    print(
        f"{key}: online {on:.4f} ({got_online['scored']} scored, "
        f"{got_online['unmatched']} unmatched, {got_online['stale_lists']} judged by a list "
        f"from before the previous event) | offline prequential {off:.4f} "
        f"({got_offline['targets']} targets) | relative difference "
        f"{result['relative_difference']:.1%}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    pl.Config.set_tbl_rows(5)
    sys.exit(main())
