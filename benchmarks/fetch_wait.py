"""Does the embedded broker answer a waiting fetch as soon as a record arrives?

    python benchmarks/fetch_wait.py [--records 40] [--waits 5,20,100,500] [--json OUT.json]

A consumer's fetch request names a longest wait (``fetch_max_wait_ms``; the worker's is
``kafka.fetch_max_wait_ms``). A broker that holds every request for the whole wait, even once a
record has come, would add about half that wait to each hop on average. For each wait this starts
an aiokafka consumer (the client Faust's workers use) at the end of a scratch topic of a fresh
embedded broker, then produces single records (no linger) at random gaps of 50 to 300 ms and
times each from its send to its arrival. The comparison, printed beside it, is half the wait: what
a hop would cost on average if the broker held the request to the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infra.broker import BrokerStartError, EmbeddedBroker

TOPIC = "bench.fetch-wait.v1"


async def hop_latencies(bootstrap: str, wait_ms: int, records: int, seed: int) -> list[float]:
    """Milliseconds from each record's send to its arrival at a consumer fetching with
    ``wait_ms``."""
    from aiokafka import AIOKafkaConsumer
    from confluent_kafka import Producer

    consumer = AIOKafkaConsumer(
        TOPIC,
        bootstrap_servers=bootstrap,
        group_id=f"fetch-wait-{wait_ms}",
        fetch_max_wait_ms=wait_ms,
        auto_offset_reset="latest",
    )
    await consumer.start()
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
    rng = random.Random(seed)
    try:
        while not consumer.assignment():
            await asyncio.sleep(0.05)
        await consumer.seek_to_end()
        await asyncio.sleep(1.0)  # the consumer's first fetch is waiting at the end
        latencies = []
        for _ in range(records):
            await asyncio.sleep(rng.uniform(0.05, 0.3))
            sent = time.perf_counter()
            producer.produce(TOPIC, b"x")
            producer.flush()
            await consumer.getone()
            latencies.append((time.perf_counter() - sent) * 1000)
        return latencies
    finally:
        await consumer.stop()


def create_topic(bootstrap: str) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(TOPIC, 1, 1)])[TOPIC].result(timeout=30)


def summary(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "p50": round(statistics.median(ordered), 2),
        "p95": round(ordered[round(0.95 * (len(ordered) - 1))], 2),
        "max": round(ordered[-1], 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=40, help="records per wait (default 40)")
    parser.add_argument("--waits", default="5,20,100,500", help="fetch waits in ms")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    try:
        waits = [int(w) for w in args.waits.split(",")]
    except ValueError:
        print(f"error: --waits takes comma-separated whole ms, not {args.waits!r}", file=sys.stderr)
        return 2
    if args.records < 1 or any(w < 1 for w in waits):
        print("error: --records and every wait must be at least 1", file=sys.stderr)
        return 2
    rows: list[dict[str, Any]] = []
    try:
        with (
            tempfile.TemporaryDirectory() as tmp,
            EmbeddedBroker(log_file=Path(tmp) / "broker.log") as broker,
        ):
            create_topic(broker.bootstrap_servers)
            print(
                f"{'wait ms':>8} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} {'held to the end':>16}"
            )
            for n, wait in enumerate(waits):
                got = summary(
                    asyncio.run(hop_latencies(broker.bootstrap_servers, wait, args.records, n))
                )
                rows.append({"fetch_max_wait_ms": wait, "latency_ms": got, "held_p50_ms": wait / 2})
                print(
                    f"{wait:>8} {got['p50']:>8.2f} {got['p95']:>8.2f} {got['max']:>8.2f} "
                    f"{wait / 2:>16.1f}"
                )
    except BrokerStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"records": args.records, "runs": rows}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
