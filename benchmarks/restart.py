"""Restart recovery: tables in RocksDB against tables in memory, on the embedded stack.

    python benchmarks/restart.py --events 10000 --users 5000 --json bench-out/restart.json

For each table store (``RECSTREAM_STREAM__TABLE_STORE``), in one run and each on a fresh broker:

1. a worker (role ``all``) embeds a small synthetic catalogue (``--items``) and absorbs
   ``--events`` behaviour events from ``--users`` users, until both hops have committed them;
2. it is stopped with SIGTERM;
3. one more behaviour event (the probe) is published and the worker is started again on the same
   data directory. The figure is the time from that start to the probe's list on the
   recommendation topic: process start-up, table recovery and one list.

Beside it: how many changelog records the tables hold (what an in-memory restart reads again)
and, for RocksDB, how many the restarted worker read (its ``table_recovered`` log lines).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from confluent_kafka import Consumer, TopicPartition
from e2e import catalogue, embed_catalogue, load, send_planned
from faust.types import TP
from latency import BenchError, committed, embedded_stack, provenance, run_and_emit, running_worker

from infra.kafka import consumer_config
from infra.settings import Settings
from producers.producer import BehaviorProducer
from schemas.topics import BEHAVIOR, RECOMMENDATIONS, USER_UPDATES
from streams.transport import changelog_ends

STORES = ("memory", "rocksdb")
TABLES = ("user-state", "covisit", "popularity")
LIST_TIMEOUT_S = 300.0


def _changelog(settings: Settings, table: str) -> str:
    return f"{settings.stream.app_id}-{table}-changelog"


def _wait_list(settings: Settings, event_id: str, start: dict[int, int], alive: Any) -> float:
    """Block until a list triggered by ``event_id`` is on the recommendation topic; the time."""
    reader = Consumer(consumer_config(settings.kafka, f"bench-restart-{uuid.uuid4().hex[:6]}"))
    reader.assign([TopicPartition(RECOMMENDATIONS.name, p, o) for p, o in start.items()])
    deadline = time.monotonic() + LIST_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            alive()
            message = reader.poll(0.2)
            if message is None or message.error():
                continue
            if json.loads(message.value() or b"{}").get("trigger_event_id") == event_id:
                return time.monotonic()
    finally:
        reader.close()
    raise BenchError(f"no list for {event_id} within {LIST_TIMEOUT_S:.0f} s of the restart")


def changelog_records(settings: Settings, topic: str) -> int:
    """Records in a topic: one past each partition's last record (the embedded broker reports
    less as its high watermark, hence the probe)."""
    tps = [TP(topic, p) for p in range(settings.kafka.partitions)]
    return sum(changelog_ends(settings.kafka, tps).values())


def _list_offsets(settings: Settings) -> dict[int, int]:
    probe = Consumer(consumer_config(settings.kafka, f"bench-restart-{uuid.uuid4().hex[:6]}"))
    try:
        parts = probe.list_topics(RECOMMENDATIONS.name, timeout=10).topics[RECOMMENDATIONS.name]
        return {
            p: probe.get_watermark_offsets(TopicPartition(RECOMMENDATIONS.name, p), timeout=10)[1]
            for p in parts.partitions
        }
    finally:
        probe.close()


def one_store(store: str, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    items = catalogue(args.items, rng)
    events = load(rng, f"ev-{store}", args.events, args.users, args.items)
    env = {"RECSTREAM_STREAM__TABLE_STORE": store}
    with embedded_stack(f"bench-restart-{store}-") as (tmp, settings, _):
        (tmp / "first").mkdir()
        with running_worker(settings, tmp / "first", **env) as (_, alive):
            embed_catalogue(settings, items, alive)
            started = time.monotonic()
            with BehaviorProducer(settings, source="benchmark") as producer:
                for event in events:
                    send_planned(producer, event)
            while committed(settings, BEHAVIOR.name) < len(events):
                alive()
                time.sleep(0.5)
            updates = changelog_records(settings, USER_UPDATES.name)  # what went through the topic
            while committed(settings, USER_UPDATES.name) < updates:
                alive()
                time.sleep(0.5)
            absorbed_s = time.monotonic() - started
        records = {t: changelog_records(settings, _changelog(settings, t)) for t in TABLES}
        start = _list_offsets(settings)
        probe = f"probe-{store}"
        with BehaviorProducer(settings, source="benchmark") as producer:
            producer.view(events[0].key, events[0].item_id, event_id=probe)
        (tmp / "second").mkdir()
        restarted = time.monotonic()
        with running_worker(settings, tmp / "second", **env) as (_, alive):
            arrived = _wait_list(settings, probe, start, alive)
        log = (tmp / "second" / "worker.log").read_text(errors="replace")
        read = [int(n) for n in re.findall(r"table_recovered\s+changelog_records=(\d+)", log)]
        return {
            "store": store,
            "absorb_s": round(absorbed_s, 1),
            "changelog_records": records,
            "changelog_records_total": sum(records.values()),
            "restart_to_list_s": round(arrived - restarted, 2),
            "records_read_on_restart": sum(read) if store == "rocksdb" else sum(records.values()),
        }


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows = [one_store(store, args) for store in STORES]
    memory = rows[0]["restart_to_list_s"]
    for row in rows:
        row["vs_memory"] = round(row["restart_to_list_s"] / memory, 2) if memory else None
    return {
        "events": args.events,
        "users": args.users,
        "items": args.items,
        "stores": rows,
        **provenance(),
    }


def table(r: dict[str, Any]) -> str:
    lines = [
        f"restart after {r['events']:,} events from {r['users']:,} users ({r['items']:,} items)",
        "| store | changelog records | read again on restart | restart to first list | vs memory |",
        "|---|---|---|---|---|",
    ]
    for row in r["stores"]:
        lines.append(
            f"| {row['store']} | {row['changelog_records_total']:,} | "
            f"{row['records_read_on_restart']:,} | {row['restart_to_list_s']:.2f} s | "
            f"{row['vs_memory']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="restart.py", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=5_000)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if min(args.events, args.users, args.items) < 1:
        parser.error("--events, --users and --items must be 1 or more")
    return run_and_emit("restart.py", run, table, args)


if __name__ == "__main__":
    sys.exit(main())
