"""How long does the embedded broker hold a consumer's fetch once a record has come?

    python benchmarks/fetch_wait.py [--rate 200] [--seconds 5] [--waits 5,20,100] [--json OUT.json]

A consumer's fetch request names a longest wait (``fetch_max_wait_ms``; the worker's is
``kafka.fetch_max_wait_ms``). Apache Kafka answers a waiting fetch as soon as a record comes; a
broker that looks for new records only now and then holds each record until it looks. For each wait
this measures, on a fresh embedded broker and a scratch topic of four partitions:

- **stream**: records produced (no linger) in an open loop at ``--rate`` records/s for
  ``--seconds``, read by an aiokafka consumer (the client Faust's workers use) in its own thread;
  each record's latency runs from its due time to its arrival, as in ``benchmarks/e2e.py``. The
  broker's CPU share over the stream is read from ``/proc``.
- **awaited**: ``--records`` single records at random gaps of 50 to 300 ms, each awaited before the
  next is sent, from a consumer in the producing thread's event loop.

The comparison printed beside them is a quarter of the wait: the median a record would wait if the
broker looked for records every half wait.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e import Usage

from infra.broker import BrokerStartError, EmbeddedBroker

PARTITIONS = 4


def create_topic(bootstrap: str, topic: str) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])[topic].result(timeout=30)


async def consumer_at_end(bootstrap: str, topic: str, wait_ms: int) -> Any:
    """A started aiokafka consumer of ``topic`` with ``wait_ms`` fetches, its first fetch waiting
    at the topic's end."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"fetch-wait-{topic}",
        fetch_max_wait_ms=wait_ms,
        auto_offset_reset="latest",
    )
    await consumer.start()
    while not consumer.assignment():
        await asyncio.sleep(0.05)
    await consumer.seek_to_end()
    await asyncio.sleep(1.0)
    return consumer


class Reader(threading.Thread):
    """An aiokafka consumer at the end of ``topic`` that stamps each record's arrival."""

    def __init__(self, bootstrap: str, topic: str, wait_ms: int) -> None:
        super().__init__(name=f"reader-{topic}", daemon=True)
        self.bootstrap, self.topic, self.wait_ms = bootstrap, topic, wait_ms
        self.arrived: dict[int, float] = {}
        self.ready, self.halt = threading.Event(), threading.Event()

    def run(self) -> None:
        asyncio.run(self._read())

    async def _read(self) -> None:
        consumer = await consumer_at_end(self.bootstrap, self.topic, self.wait_ms)
        try:
            self.ready.set()
            while not self.halt.is_set():
                batch = await consumer.getmany(timeout_ms=50)
                now = time.monotonic()
                for records in batch.values():
                    for record in records:
                        self.arrived[int(record.value)] = now
        finally:
            await consumer.stop()


def stream(broker: EmbeddedBroker, topic: str, wait_ms: int, rate: float, seconds: float) -> dict:
    """Open loop at ``rate``: latencies from each record's due time, and the broker's CPU share."""
    from confluent_kafka import Producer

    create_topic(broker.bootstrap_servers, topic)
    reader = Reader(broker.bootstrap_servers, topic, wait_ms)
    reader.start()
    if not reader.ready.wait(30):
        raise RuntimeError("the reader did not start")
    producer = Producer({"bootstrap.servers": broker.bootstrap_servers, "linger.ms": 0})
    count = int(rate * seconds)
    due: dict[int, float] = {}
    pid = broker.pid
    assert pid is not None
    cpu0, t0 = Usage.of(pid).cpu_s, time.monotonic() + 0.05
    for n in range(count):
        at = t0 + n / rate
        while (left := at - time.monotonic()) > 0:
            time.sleep(min(left, 0.0005))
        due[n] = at
        producer.produce(topic, key=str(n % 1000).encode(), value=str(n).encode())
        producer.poll(0)
    producer.flush(10)
    cpu = (Usage.of(pid).cpu_s - cpu0) / (time.monotonic() - t0)
    time.sleep(0.5)
    reader.halt.set()
    reader.join(10)
    latencies = [(reader.arrived[n] - due[n]) * 1000 for n in due if n in reader.arrived]
    return {
        **summary(latencies),
        "arrived": len(latencies),
        "broker_cpu_percent": round(100 * cpu, 1),
    }


async def awaited(bootstrap: str, topic: str, wait_ms: int, records: int, seed: int) -> list[float]:
    """Milliseconds from each single record's send to its arrival, the next sent only after."""
    from confluent_kafka import Producer

    consumer = await consumer_at_end(bootstrap, topic, wait_ms)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
    rng = random.Random(seed)
    try:
        latencies = []
        for _ in range(records):
            await asyncio.sleep(rng.uniform(0.05, 0.3))
            sent = time.perf_counter()
            producer.produce(topic, b"x")
            producer.flush()
            await consumer.getone()
            latencies.append((time.perf_counter() - sent) * 1000)
        return latencies
    finally:
        await consumer.stop()


def summary(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    if not ordered:
        return {"p50": float("nan"), "p95": float("nan"), "max": float("nan")}
    return {
        "p50": round(statistics.median(ordered), 2),
        "p95": round(ordered[round(0.95 * (len(ordered) - 1))], 2),
        "max": round(ordered[-1], 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200.0, help="records/s of the stream")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds of stream per wait")
    parser.add_argument("--records", type=int, default=20, help="awaited records per wait")
    parser.add_argument("--waits", default="5,20,100", help="fetch waits in ms")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    try:
        waits = [int(w) for w in args.waits.split(",")]
    except ValueError:
        print(f"error: --waits takes comma-separated whole ms, not {args.waits!r}", file=sys.stderr)
        return 2
    if args.records < 1 or args.rate <= 0 or args.seconds <= 0 or any(w < 1 for w in waits):
        print(
            "error: --records, --rate, --seconds and every wait must be positive", file=sys.stderr
        )
        return 2
    rows: list[dict[str, Any]] = []
    try:
        with (
            tempfile.TemporaryDirectory() as tmp,
            EmbeddedBroker(log_file=Path(tmp) / "broker.log") as broker,
        ):
            print(
                f"{'wait ms':>8} | {'stream p50':>10} {'p95':>7} {'max':>7} {'broker CPU':>10} "
                f"| {'awaited p50':>11} {'p95':>7} | {'wait/4':>6}"
            )
            for n, wait in enumerate(waits):
                flow = stream(broker, f"bench.fetch-wait-{n}.v1", wait, args.rate, args.seconds)
                topic = f"bench.fetch-wait-single-{n}.v1"
                create_topic(broker.bootstrap_servers, topic)
                single = summary(
                    asyncio.run(awaited(broker.bootstrap_servers, topic, wait, args.records, n))
                )
                rows.append(
                    {
                        "fetch_max_wait_ms": wait,
                        "stream_ms": flow,
                        "awaited_ms": single,
                        "quarter_wait_ms": wait / 4,
                    }
                )
                print(
                    f"{wait:>8} | {flow['p50']:>10.2f} {flow['p95']:>7.2f} {flow['max']:>7.2f} "
                    f"{flow['broker_cpu_percent']:>9.1f}% | {single['p50']:>11.2f} "
                    f"{single['p95']:>7.2f} | {wait / 4:>6.1f}",
                    flush=True,
                )
    except BrokerStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"rate": args.rate, "seconds": args.seconds, "runs": rows}, indent=2) + "\n"
        )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
