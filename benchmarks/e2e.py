"""The whole stream path under load, beside Faust's no-op ceiling and a raw Kafka loop, one run.

    python benchmarks/e2e.py --rate 500 --duration 60 --json OUT.json   # fixed rate, open loop
    python benchmarks/e2e.py --max --events 20000 --json OUT.json       # sustained throughput

On a fresh embedded broker it first measures the two comparisons, each on its own scratch topic
already holding ``--ceiling-events`` small JSON events:

- **raw loop**: one confluent-kafka consumer and producer in this process (consume, parse, update
  a dict, produce one output per event), the transport's limit;
- **Faust no-op**: a Faust worker (recstream's app class and client settings) whose one agent
  only counts (``benchmarks/faust_noop.py``), Faust's own ceiling.

Then it starts a recstream worker (role ``all``, MiniLM on the CPU), publishes a synthetic
catalogue of ``--items`` items with text and waits until every item is embedded, and plays
behaviour events of ``--users`` users:

- at ``--rate`` events/s for ``--duration`` s, open loop: event i is due at t0 + i/rate and its
  latency runs from that due time to its recommendation, so a stall cannot hide;
- with ``--max``, ``--events`` events published at once; the throughput is events over the time
  until the worker has committed all of them (on the user-updates topic too, with ``--hops 2``).

``--hops 1`` (the default, as the worker runs by default) has the worker's ingest agent apply a
user's behaviour to the user state itself; ``--hops 2`` sends every update through the
user-updates topic to the user-state agent (``RECSTREAM_STREAM__DIRECT_UPDATES=false``), as
between workers of split roles.

An event with no recommendation of its own counts as coalesced when a later event of the same user
got one (lists are debounced per user), and as lost otherwise. It also reports dead letters, the
worker's CPU share and resident memory, and the CPU shares of the broker and of this process (the
publisher and the reader of the lists): on a small machine all three share the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from confluent_kafka import Consumer, Producer, TopicPartition
from latency import (
    STRAGGLER_S,
    BenchError,
    Collector,
    Planned,
    _recommendation,
    await_arrivals,
    committed,
    embedded_stack,
    open_loop,
    percentiles,
    phase_result,
    provenance,
    run_and_emit,
    running_worker,
    wait_embedded,
)

from infra.kafka import consumer_config, producer_config
from infra.settings import Settings
from producers.producer import BehaviorProducer
from schemas.topics import BEHAVIOR, DEAD_LETTER, RECOMMENDATIONS, USER_UPDATES, TopicSpec
from streams.spawn import stop_process

KINDS = ("view", "view", "click", "click", "add_to_cart", "purchase")
WARM_UP = 200  # events played before each measured load
TOPICS = (
    "astronomy",
    "baking",
    "camping",
    "chess",
    "cycling",
    "gardening",
    "guitar",
    "jazz",
    "knitting",
    "photography",
    "poetry",
    "robotics",
    "running",
    "sailing",
    "science fiction",
    "skiing",
    "tea",
    "woodworking",
    "yoga",
    "zoology",
)
WORDS = (
    "classic",
    "compact",
    "durable",
    "elegant",
    "gentle",
    "handmade",
    "light",
    "modern",
    "portable",
    "quiet",
    "robust",
    "simple",
    "sturdy",
    "vintage",
    "warm",
    "bright",
    "colourful",
    "deluxe",
    "everyday",
    "practical",
    "beginner",
    "expert",
    "travel",
    "home",
    "outdoor",
    "indoor",
    "gift",
    "set",
    "kit",
    "guide",
    "book",
    "tool",
    "pack",
    "collection",
    "edition",
    "series",
)
CEILING_TIMEOUT_S = 300.0


def scratch(name: str) -> TopicSpec:
    """A topic of this run's memory-only broker, not one recstream reads or writes."""
    return TopicSpec(f"bench.e2e-{name}.v1", "key", "delete", True, f"e2e benchmark: {name}")


# -- the comparisons ---------------------------------------------------------------------------


def fill(settings: Settings, topic: str, count: int) -> None:
    """``count`` small behaviour-like JSON events on ``topic``, keyed by user."""
    producer = Producer(producer_config(settings.kafka, **{"linger.ms": 20}))
    for i in range(count):
        body = {"type": "click", "user_id": f"u{i % 1000}", "item_id": f"i{i % 10000}", "n": i}
        producer.produce(topic, key=body["user_id"].encode(), value=json.dumps(body).encode())
        if i % 10_000 == 0:
            producer.poll(0)
    if producer.flush(60):
        raise BenchError(f"could not fill {topic}")


def raw_loop(settings: Settings, source: str, sink: str, count: int) -> float:
    """Events/s of consume -> parse -> dict update -> produce, timed from the first message."""
    consumer = Consumer(
        consumer_config(
            settings.kafka,
            f"bench-raw-{uuid.uuid4().hex[:6]}",
            **{"enable.auto.commit": False, "auto.offset.reset": "earliest"},
        )
    )
    parts = consumer.list_topics(source, timeout=10).topics[source].partitions
    consumer.assign([TopicPartition(source, p, 0) for p in parts])
    producer = Producer(producer_config(settings.kafka, **{"linger.ms": 5}))
    state: dict[str, int] = {}
    seen, first = 0, 0.0
    deadline = time.monotonic() + CEILING_TIMEOUT_S
    try:
        while seen < count and time.monotonic() < deadline:
            batch = consumer.consume(1000, 0.1)
            if batch and not seen:
                first = time.monotonic()
            for message in batch:
                if message.error():
                    continue
                body = json.loads(message.value())
                state[body["user_id"]] = state.get(body["user_id"], 0) + 1
                producer.produce(sink, key=message.key(), value=message.value())
                seen += 1
            producer.poll(0)
        producer.flush(30)
        elapsed = time.monotonic() - first
    finally:
        consumer.close()
    if seen < count:
        raise BenchError(f"the raw loop read {seen} of {count} events")
    return seen / elapsed


def faust_noop(settings: Settings, topic: str, count: int, workdir: Path) -> float:
    """Events/s of a Faust agent that only counts, in its own process."""
    out = workdir / "noop.json"
    log = workdir / "noop.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).with_name("faust_noop.py")),
                "--bootstrap",
                settings.kafka.bootstrap_servers,
                "--topic",
                topic,
                "--expect",
                str(count),
                "--partitions",
                str(settings.kafka.partitions),
                "--out",
                str(out),
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + CEILING_TIMEOUT_S
        while not out.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:]
                raise BenchError(f"the Faust no-op worker did not finish:\n{tail}")
            time.sleep(0.2)
        time.sleep(0.1)
        result = json.loads(out.read_text())
    finally:
        stop_process(proc)
    return result["events"] / result["seconds"]


# -- the catalogue and the load ----------------------------------------------------------------


def catalogue(count: int, rng: random.Random) -> list[dict[str, Any]]:
    """Synthetic items: a topic each, a title and a 25-word description about it."""
    items = []
    for n in range(count):
        topic = TOPICS[n % len(TOPICS)]
        words = [rng.choice(WORDS) for _ in range(22)]
        title = f"{rng.choice(WORDS).title()} {topic} {rng.choice(WORDS)} {n}"
        items.append(
            {
                "type": "item",
                "item_id": f"item-{n:06d}",
                "title": title,
                "categories": [topic],
                "description": f"A {topic} {' '.join(words)} for {topic} lovers.",
            }
        )
    return items


def embed_catalogue(
    settings: Settings, items: list[dict[str, Any]], alive: Callable[[], None]
) -> float:
    """Publish the catalogue and wait until the worker has embedded every item; the seconds."""
    started = time.monotonic()
    with BehaviorProducer(settings, source="benchmark") as producer:
        for item in items:
            producer.send_dict(item)
    wait_embedded(settings, len(items), alive)
    return time.monotonic() - started


def load(rng: random.Random, prefix: str, count: int, users: int, items: int) -> list[Planned]:
    """Behaviour events; each user keeps to two favourite topics (items are dealt by topic)."""
    topics = len(TOPICS)
    favourite = {u: (rng.randrange(topics), rng.randrange(topics)) for u in range(users)}
    out = []
    for i in range(count):
        user = rng.randrange(users)
        topic = rng.choice(favourite[user])
        item = topic + topics * rng.randrange(max(items // topics, 1))
        out.append(
            Planned(f"{prefix}-{i:07d}", f"user-{user:05d}", f"item-{item:06d}", rng.choice(KINDS))
        )
    return out


@dataclass
class Usage:
    """CPU seconds and resident memory of a process, from /proc."""

    cpu_s: float
    rss_mib: float
    peak_rss_mib: float

    @classmethod
    def of(cls, pid: int) -> Usage:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        cpu = (int(stat[11]) + int(stat[12])) / ticks
        fields = dict(
            line.split(":", 1)
            for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if ":" in line
        )
        kib = {k: int(fields[k].split()[0]) for k in ("VmRSS", "VmHWM")}
        return cls(cpu, kib["VmRSS"] / 1024, kib["VmHWM"] / 1024)


def end_offsets(settings: Settings, topic: str) -> int:
    consumer = Consumer(consumer_config(settings.kafka, f"bench-probe-{uuid.uuid4().hex[:6]}"))
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return sum(
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts
        )
    finally:
        consumer.close()


@dataclass(frozen=True)
class Workers:
    """The processes under test and the groups that commit each hop (one worker of role ``all``:
    its pid and the app id twice)."""

    pids: tuple[int, ...]
    behaviour_group: str
    updates_group: str

    def usage(self) -> Usage:
        """CPU and memory of every process, added up."""
        each = [Usage.of(pid) for pid in self.pids]
        return Usage(
            sum(u.cpu_s for u in each),
            sum(u.rss_mib for u in each),
            sum(u.peak_rss_mib for u in each),
        )


def draw(args: argparse.Namespace) -> tuple[list[Planned], list[Planned]]:
    """A run's warm-up events and its measured ones (``--events``, or rate times duration)."""
    rng = random.Random(args.seed)
    tag = uuid.uuid4().hex[:6]
    count = args.events if args.max else int(args.rate * args.duration)
    warm = load(rng, f"warm-{tag}", WARM_UP, args.users, args.items)
    return warm, load(rng, f"ev-{tag}", count, args.users, args.items)


def send_planned(producer: BehaviorProducer, event: Planned) -> None:
    """Publish one planned behaviour event under its own event id."""
    getattr(producer, event.kind)(event.key, event.item_id, event_id=event.event_id)


def measure(
    settings: Settings,
    args: argparse.Namespace,
    alive: Callable[[], None],
    workers: Workers,
    *,
    warm: list[Planned],
    planned: list[Planned],
    broker_pid: int | None = None,
) -> dict[str, Any]:
    """Warm up, then the measured load; latencies, throughput, usage (the broker's CPU too, given
    its pid, and this process's)."""
    collector = Collector(settings, RECOMMENDATIONS.name, _recommendation)
    collector.start()
    collector.ready.wait(10)
    try:
        with BehaviorProducer(settings, source="benchmark", linger_ms=5) as producer:
            send = partial(send_planned, producer)
            open_loop(warm, 100.0, send, "warm-up")
            producer.flush()
            await_arrivals(collector, warm, 120.0, alive)
            base_behaviour = committed(settings, BEHAVIOR.name, workers.behaviour_group)
            before, started = workers.usage(), time.monotonic()
            broker_before = Usage.of(broker_pid).cpu_s if broker_pid else 0.0
            own_before = Usage.of(os.getpid()).cpu_s  # the publisher and the reader of lists
            if args.max:
                due = {}
                for event in planned:
                    due[event.event_id] = time.monotonic()
                    send(event)
                    producer.poll(0)
                producer.flush()
                achieved = None
            else:
                due, achieved = open_loop(planned, args.rate, send, "measured")
                producer.flush()
            # wait until the worker has committed every measured event (for the usage figures);
            # with two hops the ingest hop packs several updates to a message, so once it has
            # committed the load, the second hop is done at the user-update topic's end
            target = base_behaviour + len(planned)
            deadline = time.monotonic() + max(STRAGGLER_S, 10.0 * len(planned) / 1000)
            updates_end = None
            while time.monotonic() < deadline:
                alive()
                if updates_end is None and (
                    committed(settings, BEHAVIOR.name, workers.behaviour_group) >= target
                ):
                    updates_end = end_offsets(settings, USER_UPDATES.name)
                if updates_end is not None and (
                    committed(settings, USER_UPDATES.name, workers.updates_group) >= updates_end
                ):
                    break
                time.sleep(0.2)
            after = workers.usage()
            broker_cpu_s = Usage.of(broker_pid).cpu_s - broker_before if broker_pid else None
            own_cpu_s = Usage.of(os.getpid()).cpu_s - own_before
            await_arrivals(collector, planned, STRAGGLER_S, alive)
            phase = phase_result(planned, due, collector, achieved)
            # done when the last list reflecting a measured event arrived (commits lag by seconds)
            arrived = collector.snapshot()[0]
            finished = max(
                (arrived[e.event_id] for e in planned if e.event_id in arrived),
                default=time.monotonic(),
            )
    finally:
        collector.halt()
    elapsed = finished - started
    return {
        "events": len(planned),
        "events_per_s": round(len(planned) / elapsed, 1),
        "achieved_send_rate": None if achieved is None else round(achieved, 1),
        "seconds": round(elapsed, 2),
        "latency_ms": percentiles(phase.latency_ms),
        "worker_latency_ms": percentiles(phase.extra_ms),
        "received": len(phase.latency_ms) - phase.coalesced,  # lists naming a measured event
        "coalesced": phase.coalesced,
        "lost": phase.lost,
        "worker_cpu_percent": round(100 * (after.cpu_s - before.cpu_s) / elapsed, 1),
        "worker_rss_mib": round(after.rss_mib, 1),
        "worker_peak_rss_mib": round(after.peak_rss_mib, 1),
        "broker_cpu_percent": (
            None if broker_cpu_s is None else round(100 * broker_cpu_s / elapsed, 1)
        ),
        "benchmark_cpu_percent": round(100 * own_cpu_s / elapsed, 1),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    raw_in, raw_out, noop = scratch("raw-in"), scratch("raw-out"), scratch("noop")
    with embedded_stack("recstream-e2e-", raw_in, raw_out, noop) as (tmp, settings, broker):
        print(f"comparisons: {args.ceiling_events} events each", file=sys.stderr, flush=True)
        fill(settings, raw_in.name, args.ceiling_events)
        raw = raw_loop(settings, raw_in.name, raw_out.name, args.ceiling_events)
        fill(settings, noop.name, args.ceiling_events)
        noop_rate = faust_noop(settings, noop.name, args.ceiling_events, tmp)
        print(
            f"  raw loop {raw:,.0f} events/s, Faust no-op {noop_rate:,.0f} events/s",
            file=sys.stderr,
            flush=True,
        )
        hops = {} if args.hops == 1 else {"RECSTREAM_STREAM__DIRECT_UPDATES": "false"}
        with running_worker(settings, tmp, **hops) as (worker, alive):
            items = catalogue(args.items, random.Random(args.seed))
            embed_s = embed_catalogue(settings, items, alive)
            print(
                f"  catalogue of {len(items):,} items embedded in {embed_s:.0f} s",
                file=sys.stderr,
                flush=True,
            )
            app, (warm, planned) = settings.stream.app_id, draw(args)
            workers = Workers((worker.pid,), app, app)
            result = measure(
                settings, args, alive, workers, warm=warm, planned=planned, broker_pid=broker
            )
            result["dead_lettered"] = end_offsets(settings, DEAD_LETTER.name)
    return {
        **provenance(),
        "mode": "max" if args.max else "rate",
        "rate": None if args.max else args.rate,
        "duration_s": None if args.max else args.duration,
        "items": args.items,
        "users": args.users,
        "partitions": settings.kafka.partitions,
        "hops": args.hops,
        "catalogue_embed_s": round(embed_s, 1),
        **result,
        "faust_noop_events_per_s": round(noop_rate, 1),
        "raw_loop_events_per_s": round(raw, 1),
        "ratio_vs_faust_noop": round(result["events_per_s"] / noop_rate, 3),
        "ratio_vs_raw_loop": round(result["events_per_s"] / raw, 4),
    }


def _hops(r: dict[str, Any]) -> str:
    return "two hops" if r.get("hops") == 2 else "one hop"


def table(r: dict[str, Any]) -> str:
    lat = r["latency_ms"]
    mode = (
        "as fast as possible"
        if r["mode"] == "max"
        else f"at {r['rate']:g}/s for {r['duration_s']:g} s"
    )
    return "\n".join(
        [
            f"recstream e2e: {r['events']:,} behaviour events {mode}, {r['users']:,} users, "
            f"{r['items']:,} items, {r['partitions']} partitions, one worker, embedded broker, cpu",
            f"{'':<28}{'events/s':>12}{'ratio':>10}",
            f"{'recstream (' + _hops(r) + ')':<28}{r['events_per_s']:>12,.0f}{'':>10}",
            f"{'Faust no-op ceiling':<28}{r['faust_noop_events_per_s']:>12,.0f}"
            f"{r['ratio_vs_faust_noop']:>9.1%} ",
            f"{'raw confluent-kafka loop':<28}{r['raw_loop_events_per_s']:>12,.0f}"
            f"{r['ratio_vs_raw_loop']:>9.1%} ",
            f"latency ms (from due time): p50 {lat['p50']}, p95 {lat['p95']}, p99 {lat['p99']}, "
            f"max {lat['max']}",
            f"received {r['received']:,}, coalesced {r['coalesced']:,}, lost {r['lost']}, "
            f"dead-lettered {r['dead_lettered']}; worker CPU {r['worker_cpu_percent']}%, "
            f"RSS {r['worker_rss_mib']} MiB (peak {r['worker_peak_rss_mib']}); "
            f"broker CPU {r.get('broker_cpu_percent')}%, this benchmark's own process "
            f"(publisher, reader) {r.get('benchmark_cpu_percent')}%",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="e2e.py", description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=500.0, help="events per second")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--max", action="store_true", help="sustained throughput instead")
    parser.add_argument("--events", type=int, default=20_000, help="events in --max mode")
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=1_000)
    parser.add_argument("--ceiling-events", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument(
        "--hops",
        type=int,
        choices=(1, 2),
        default=1,
        help="1: the ingest agent applies user updates itself; 2: through the user-updates topic",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if min(args.rate, args.duration, args.events, args.items, args.users, args.ceiling_events) <= 0:
        parser.error("rates, durations and counts must be positive")
    if args.json is not None and not args.json.parent.is_dir():
        parser.error(f"--json: no such directory: {args.json.parent}")
    return run_and_emit("e2e.py", run, table, args)


if __name__ == "__main__":
    sys.exit(main())
