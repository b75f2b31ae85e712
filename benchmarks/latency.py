"""Event-to-recommendation latency on the embedded stack, beside the broker's one-hop floor.

Starts the embedded broker and a worker (role all) in a temp dir, publishes the demo catalogue and
waits until the encoder has committed it, warms up, then plays behaviour events open-loop at a fixed
rate: event i is due at t0 + i/rate, and its latency is the time its recommendation was consumed
minus that due time, so a stalled sender shows up as latency instead of hiding. The comparison,
measured in the same run on the same broker, is the transport floor: the same count of messages at
the same rate, produced and consumed on one hop of a scratch topic with the same client settings.

    python benchmarks/latency.py [--events 300] [--rate 20] [--users 100] [--json OUT.json]

With ``--reviews`` the measured events are reviews, and each one's latency runs until its
``review_embedded`` update reaches the user-updates topic: the encode step sends that update only
after the review's vector is stored, so it is the time from publishing a review to its vector
being queryable in the vector store.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from infra.broker import BrokerStartError, EmbeddedBroker
from infra.kafka import consumer_config, group_progress, producer_config, provision_topics
from infra.logs import configure_logging
from infra.settings import Settings, load_settings
from producers.demo.data import catalog
from producers.producer import BehaviorProducer
from schemas.topics import ENCODE_REQUESTS, RECOMMENDATIONS, USER_UPDATES, TopicSpec
from streams.spawn import spawn_worker, stop_process

KINDS = ("click", "view", "purchase")
WARMUP_EVENTS = 20
LINGER_MS = 5  # BehaviorProducer's default; the floor's producer uses the same
EMBED_TIMEOUT_S = 300.0
WARMUP_TIMEOUT_S = 60.0
STRAGGLER_S = 30.0
PROGRESS_EVERY_S = 2.0
#: A scratch topic for the floor; it lives only in this run's memory-only broker, so it is not
#: declared in schemas/topics.py with the topics recstream itself reads and writes.
FLOOR_TOPIC = TopicSpec(
    "bench.latency-floor.v1", "key", "delete", True, "one-hop transport floor of the benchmark"
)


class BenchError(Exception):
    """The benchmark could not run; reported as one line."""


@dataclass(frozen=True, slots=True)
class Planned:
    """One message to send: its id, its key (the user) and, for behaviour, the item and kind."""

    event_id: str
    key: str
    item_id: str = ""
    kind: str = ""


@dataclass(frozen=True, slots=True)
class Phase:
    """What one open-loop phase measured: latencies (ms) and the send rate it achieved."""

    latency_ms: list[float]
    extra_ms: list[float]
    achieved_rate: float | None  # None with a single event
    coalesced: int
    lost: int


# -- consuming -------------------------------------------------------------------------------


class Collector(threading.Thread):
    """Reads a topic from its current end and stamps when each id first arrived (monotonic)."""

    def __init__(
        self, settings: Settings, topic: str, parse: Callable[[bytes], tuple[str, float | None]]
    ) -> None:
        super().__init__(name=f"collect-{topic}", daemon=True)
        conf = consumer_config(
            settings.kafka, f"bench-latency-{uuid.uuid4().hex[:8]}", **{"enable.auto.commit": False}
        )
        self._consumer = Consumer(conf)
        partitions = self._consumer.list_topics(topic, timeout=10).topics[topic].partitions
        start = []
        for p in sorted(partitions):
            _, high = self._consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            start.append(TopicPartition(topic, p, high))
        self._consumer.assign(start)
        self._parse = parse
        self._lock = threading.Lock()
        self._arrived: dict[str, float] = {}
        self._extra: dict[str, float] = {}
        self._halt = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                message = self._consumer.poll(0.05)
                self.ready.set()
                if message is None or message.error():
                    continue
                now = time.monotonic()
                key, extra = self._parse(message.value() or b"")
                with self._lock:
                    if key not in self._arrived:
                        self._arrived[key] = now
                        if extra is not None:
                            self._extra[key] = extra
        finally:
            self._consumer.close()

    def snapshot(self) -> tuple[dict[str, float], dict[str, float]]:
        """Arrival times and extra values (the worker's latency_ms) by id, copied."""
        with self._lock:
            return dict(self._arrived), dict(self._extra)

    def halt(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(timeout=10)


def _recommendation(value: bytes) -> tuple[str, float | None]:
    body = json.loads(value)
    return str(body["trigger_event_id"]), float(body["latency_ms"])


def _review_stored(value: bytes) -> tuple[str, float | None]:
    """A user update: the review's event id once its vector is stored; anything else is not an
    arrival of a measured event (the ingest step's behaviour update shares the review's id).
    A message of several lines is the ingest step's pack of behaviour updates."""
    if b"\n" in value:
        return "", None
    body = json.loads(value)
    return (str(body["event_id"]) if body.get("kind") == "review_embedded" else ""), None


REVIEW_WORDS = (
    "great",
    "sound",
    "solid",
    "build",
    "light",
    "easy",
    "setup",
    "loud",
    "clear",
    "warm",
    "bright",
    "cheap",
    "sturdy",
    "worth",
    "every",
    "penny",
    "arrived",
    "quickly",
    "strings",
    "buzz",
    "a",
    "little",
    "tuning",
    "holds",
    "well",
    "recommend",
    "it",
)


def review_text(rng: random.Random) -> str:
    """A review of 12 to 40 words drawn from a small vocabulary."""
    return " ".join(rng.choice(REVIEW_WORDS) for _ in range(rng.randint(12, 40))) + "."


def _floor_message(value: bytes) -> tuple[str, float | None]:
    return value.decode(), None


def unaccounted(planned: Sequence[Planned], arrived: dict[str, float]) -> list[Planned]:
    """Events with no recommendation that no later event of the same user got one for (those
    :func:`answered_at` cannot date)."""
    answered = answered_at(planned, arrived)
    return [e for e in planned if e.event_id not in answered]


def await_arrivals(
    collector: Collector, planned: Sequence[Planned], timeout_s: float, alive: Callable[[], None]
) -> None:
    """Wait until every event is answered or coalesced, or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive()
        if not unaccounted(planned, collector.snapshot()[0]):
            time.sleep(0.5)  # grace for anything still in flight
            return
        time.sleep(0.1)


# -- sending ---------------------------------------------------------------------------------


def open_loop(
    planned: Sequence[Planned], rate: float, send: Callable[[Planned], None], label: str
) -> tuple[dict[str, float], float | None]:
    """Send event i at t0 + i/rate; return each event's due time and the achieved send rate."""
    due: dict[str, float] = {}
    t0 = time.monotonic() + 0.05
    first = last = shown = t0
    for i, event in enumerate(planned):
        at = t0 + i / rate
        delay = at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        send(event)
        last = time.monotonic()
        first = last if i == 0 else first
        due[event.event_id] = at
        if last - shown >= PROGRESS_EVERY_S:
            shown = last
            pace = i / (last - first) if last > first else 0.0
            eta = (len(planned) - i - 1) / rate
            print(
                f"  {label}: {i + 1}/{len(planned)} sent, {pace:.1f} ev/s, ETA {eta:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    achieved = (len(planned) - 1) / (last - first) if last > first else None
    return due, achieved


def answered_at(planned: Sequence[Planned], arrived: dict[str, float]) -> dict[str, float]:
    """When each event was answered: its own list's arrival, or for an event coalesced into a
    later one, the arrival of the first list that a later event of the same user got.

    Recommendations are keyed by user, so they arrive in the order of that user's events: once a
    later event's list has come, an earlier event without one was coalesced into it, and that
    list is the first to reflect it.
    """
    answered: dict[str, float] = {}
    next_list: dict[str, float] = {}
    for event in reversed(planned):
        at = arrived.get(event.event_id)
        if at is not None:
            next_list[event.key] = at
        elif event.key in next_list:
            at = next_list[event.key]
        if at is not None:
            answered[event.event_id] = at
    return answered


def phase_result(
    planned: Sequence[Planned], due: dict[str, float], collector: Collector, achieved: float | None
) -> Phase:
    """Latency of every answered event, coalesced ones included (to the list that answered
    them), so a list that answers a burst does not hide the wait of the burst's first events."""
    arrived, extra = collector.snapshot()
    ids = [e.event_id for e in planned]
    answered = answered_at(planned, arrived)
    missing = sum(1 for i in ids if i not in answered)
    not_arrived = sum(1 for i in ids if i not in arrived)
    return Phase(
        latency_ms=[(answered[i] - due[i]) * 1000.0 for i in ids if i in answered],
        extra_ms=[extra[i] for i in ids if i in extra],
        achieved_rate=achieved,
        coalesced=not_arrived - missing,
        lost=missing,
    )


def plan(
    rng: random.Random, prefix: str, count: int, users: int, items: list[str]
) -> list[Planned]:
    return [
        Planned(
            f"{prefix}-{i:05d}",
            f"bench-user-{rng.randrange(users):04d}",
            rng.choice(items),
            rng.choice(KINDS),
        )
        for i in range(count)
    ]


# -- the stack -------------------------------------------------------------------------------


def committed(settings: Settings, topic: str, group: str | None = None) -> int:
    """Offsets ``group`` (default: the worker's, role all) has committed on ``topic``, summed
    (0 before it has any)."""
    try:
        return group_progress(settings.kafka, group or settings.stream.app_id, topic)[0]
    except (KafkaException, KeyError):  # the worker's group may not exist yet
        return 0


def wait_embedded(settings: Settings, total: int, alive: Callable[[], None]) -> None:
    """Block until the worker's group has committed ``total`` encode requests."""
    deadline = time.monotonic() + EMBED_TIMEOUT_S
    done, shown = 0, time.monotonic()
    while done < total:
        alive()
        if time.monotonic() > deadline:
            raise BenchError(f"the catalogue was not embedded within {EMBED_TIMEOUT_S:.0f} s")
        done = committed(settings, ENCODE_REQUESTS.name)
        if time.monotonic() - shown >= PROGRESS_EVERY_S:
            shown = time.monotonic()
            print(f"  embedding the catalogue: {done}/{total}", file=sys.stderr, flush=True)
        time.sleep(0.25)


def measure_floor(settings: Settings, args: argparse.Namespace, tag: str) -> Phase:
    """One hop: produce to the scratch topic, consume it, same rate, count and client settings.

    It warms up like the pipeline does, so neither side pays for connecting in its figures.
    """
    warm, planned = (
        [Planned(f"{prefix}-{tag}-{i:05d}", f"bench-user-{i % args.users:04d}") for i in range(n)]
        for prefix, n in (("floor-warm", WARMUP_EVENTS), ("floor", args.events))
    )
    producer = Producer(producer_config(settings.kafka, **{"acks": "all", "linger.ms": LINGER_MS}))
    collector = Collector(settings, FLOOR_TOPIC.name, _floor_message)
    collector.start()
    collector.ready.wait(10)

    def send(event: Planned) -> None:
        producer.produce(FLOOR_TOPIC.name, key=event.key.encode(), value=event.event_id.encode())
        producer.poll(0)

    try:
        open_loop(warm, args.rate, send, "floor warm-up")
        producer.flush(10)
        await_arrivals(collector, warm, WARMUP_TIMEOUT_S, lambda: None)
        due, achieved = open_loop(planned, args.rate, send, "floor")
        producer.flush(10)
        await_arrivals(collector, planned, STRAGGLER_S, lambda: None)
        return phase_result(planned, due, collector, achieved)
    finally:
        collector.halt()
        producer.flush(5)


def measure_pipeline(
    settings: Settings, args: argparse.Namespace, tag: str, alive: Callable[[], None]
) -> Phase:
    """Warm up, then behaviour events open-loop; latency until each one's recommendation."""
    rng = random.Random(args.seed)
    items = [item["item_id"] for item in catalog()]
    warm = plan(rng, f"warm-{tag}", WARMUP_EVENTS, args.users, items)
    measured = plan(rng, f"ev-{tag}", args.events, args.users, items)
    if args.reviews:
        collector = Collector(settings, USER_UPDATES.name, _review_stored)
    else:
        collector = Collector(settings, RECOMMENDATIONS.name, _recommendation)
    collector.start()
    collector.ready.wait(10)
    try:
        with BehaviorProducer(settings, source="benchmark", linger_ms=LINGER_MS) as producer:

            def send(event: Planned) -> None:
                if args.reviews:
                    producer.review(
                        event.key, event.item_id, review_text(rng), event_id=event.event_id
                    )
                else:
                    getattr(producer, event.kind)(event.key, event.item_id, event_id=event.event_id)

            open_loop(warm, args.rate, send, "warm-up")
            producer.flush()
            await_arrivals(collector, warm, WARMUP_TIMEOUT_S, alive)
            if not any(e.event_id in collector.snapshot()[0] for e in warm):
                raise BenchError(f"no answer within {WARMUP_TIMEOUT_S:.0f} s of warm-up")
            due, achieved = open_loop(measured, args.rate, send, "measured")
            producer.flush()
            await_arrivals(collector, measured, STRAGGLER_S, alive)
            return phase_result(measured, due, collector, achieved)
    finally:
        collector.halt()


@contextmanager
def embedded_stack(prefix: str, *scratch: TopicSpec) -> Iterator[tuple[Path, Settings, int]]:
    """A temporary directory, settings for a fresh embedded broker holding recstream's topics and
    the ``scratch`` ones, and the broker's process id; the broker is stopped by pid at the end."""
    with (
        tempfile.TemporaryDirectory(prefix=prefix) as tmp,
        EmbeddedBroker(log_file=Path(tmp) / "broker.log") as broker,
    ):
        settings = load_settings(
            data_dir=Path(tmp) / "data", kafka={"bootstrap_servers": broker.bootstrap_servers}
        )
        settings.data_dir.mkdir(parents=True)
        provision_topics(settings.kafka)
        provision_topics(settings.kafka, list(scratch))
        assert broker.pid is not None
        yield Path(tmp), settings, broker.pid


@contextmanager
def running_worker(
    settings: Settings, workdir: Path, **env: str
) -> Iterator[tuple[subprocess.Popen[bytes], Callable[[], None]]]:
    """A worker (role all, on the CPU) and a check that raises :class:`BenchError` once it has
    exited; on a BenchError the worker's log tail is printed. Stopped by pid at the end."""
    log_path = workdir / "worker.log"
    worker = spawn_worker(
        settings, log_path, RECSTREAM_STREAM__WEB_PORT="0", RECSTREAM_DEVICE="cpu", **env
    )

    def alive() -> None:
        if worker.poll() is not None:
            raise BenchError(f"the worker exited with code {worker.returncode}")

    try:
        yield worker, alive
    except BenchError:
        tail = log_path.read_text(errors="replace")[-3000:]
        print(f"worker log (tail):\n{tail}", file=sys.stderr)
        raise
    finally:
        stop_process(worker)


def run(args: argparse.Namespace) -> tuple[Phase, Phase, Settings]:
    """The whole benchmark on a fresh broker and worker, both stopped by pid at the end."""
    tag = uuid.uuid4().hex[:8]
    serving = (
        {"RECSTREAM_SERVING__MODEL_DIR": str(args.model_dir.resolve())} if args.model_dir else {}
    )
    with (
        embedded_stack("recstream-bench-", FLOOR_TOPIC) as (tmp, settings, _),
        running_worker(settings, tmp, **serving) as (_, alive),
    ):
        with BehaviorProducer(settings, source="benchmark") as producer:
            for item in catalog():
                producer.send_dict(item)
        wait_embedded(settings, len(catalog()), alive)
        floor = measure_floor(settings, args, tag)
        pipeline = measure_pipeline(settings, args, tag, alive)
    return pipeline, floor, settings


# -- reporting -------------------------------------------------------------------------------


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return dict.fromkeys(("p50", "p95", "p99", "max"))
    p50, p95, p99 = np.percentile(np.asarray(values), [50, 95, 99])
    return {
        "p50": round(float(p50), 2),
        "p95": round(float(p95), 2),
        "p99": round(float(p99), 2),
        "max": round(float(max(values)), 2),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _ratio(ours: float | None, floor: float | None) -> float | None:
    return round(ours / floor, 2) if ours is not None and floor else None


def report(args: argparse.Namespace, pipeline: Phase, floor: Phase, settings: Settings) -> dict:
    ours = percentiles(pipeline.latency_ms)
    base = percentiles(floor.latency_ms)
    return {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
        },
        "command": list(sys.argv),
        "events": args.events,
        "rate": args.rate,
        "users": args.users,
        "model_dir": str(args.model_dir) if args.model_dir else None,
        "measured": "review -> vector stored" if args.reviews else "event -> recommendation",
        "partitions": settings.kafka.partitions,
        "achieved_rate": _round(pipeline.achieved_rate),
        "received": len(pipeline.latency_ms),
        "latency_ms": ours,
        "worker_latency_ms": percentiles(pipeline.extra_ms),
        "floor_latency_ms": base,
        "floor_achieved_rate": _round(floor.achieved_rate),
        "floor_lost": floor.lost + floor.coalesced,
        "ratio_p50_vs_floor": _ratio(ours["p50"], base["p50"]),
        "ratio_p95_vs_floor": _ratio(ours["p95"], base["p95"]),
        "coalesced_or_lost": pipeline.coalesced + pipeline.lost,
        "coalesced": pipeline.coalesced,
        "lost": pipeline.lost,
    }


def table(result: dict) -> str:
    def row(name: str, stats: dict[str, float | None]) -> str:
        cells = "".join(f"{'-' if v is None else f'{v:.1f}':>9}" for v in stats.values())
        return f"{name:<34}{cells}"

    def ratio(value: float | None) -> str:
        return f"{'-' if value is None else f'{value:.2f}x':>9}"

    return "\n".join(
        [
            f"recstream latency: {result['events']} events at {result['rate']:g}/s "
            f"(achieved {result['achieved_rate']}/s), {result['users']} users, "
            f"{result['partitions']} partitions, embedded broker, cpu",
            f"{'ms':<34}{'p50':>9}{'p95':>9}{'p99':>9}{'max':>9}",
            row(f"{result['measured']} (client)", result["latency_ms"]),
            *(
                [row("worker latency_ms field", result["worker_latency_ms"])]
                if result["worker_latency_ms"]["p50"] is not None
                else []
            ),
            row("transport floor (one hop)", result["floor_latency_ms"]),
            f"{'ratio to floor':<34}{ratio(result['ratio_p50_vs_floor'])}"
            f"{ratio(result['ratio_p95_vs_floor'])}",
            f"received {result['received']}/{result['events']}; coalesced_or_lost "
            f"{result['coalesced_or_lost']} "
            f"({result['coalesced']} coalesced, {result['lost']} lost); "
            f"floor sent at {result['floor_achieved_rate']}/s, {result['floor_lost']} lost",
        ]
    )


# -- command line ----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive(kind: type[int] | type[float]) -> Callable[[str], Any]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, not {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, not {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="latency.py", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=_positive(int), default=300, help="measured events")
    parser.add_argument("--rate", type=_positive(float), default=20.0, help="events per second")
    parser.add_argument("--users", type=_positive(int), default=100, help="distinct users")
    parser.add_argument("--seed", type=int, default=7, help="seed of the event generator")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument(
        "--model-dir", type=Path, default=None, help="serve this trained model (default: untrained)"
    )
    parser.add_argument(
        "--reviews",
        action="store_true",
        help="publish reviews and measure until each one's vector is stored",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.json is not None and not args.json.parent.is_dir():
        parser.error(f"--json: no such directory: {args.json.parent}")
    if args.model_dir is not None and not (args.model_dir / "manifest.json").is_file():
        parser.error(f"--model-dir: {args.model_dir} is not a model directory (no manifest.json)")
    configure_logging("warning")
    try:
        pipeline, floor, settings = run(args)
    except (BenchError, BrokerStartError) as exc:
        print(f"latency.py: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    result = report(args, pipeline, floor, settings)
    emit(table(result), result, args.json)
    return 0


def provenance() -> dict[str, Any]:
    """Where and how a benchmark ran: the machine and the command line."""
    return {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "command": list(sys.argv),
    }


def run_and_emit(
    prog: str,
    run: Callable[[argparse.Namespace], dict[str, Any]],
    table: Callable[[dict[str, Any]], str],
    args: argparse.Namespace,
) -> int:
    """Run a benchmark; print its table and write its JSON, or say in one line why it failed."""
    configure_logging("warning")
    try:
        result = run(args)
    except (BenchError, BrokerStartError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    emit(table(result), result, args.json)
    return 0


def emit(text: str, result: dict, path: Path | None) -> None:
    """Print the table; write the figures to ``path`` as JSON when one is given."""
    print(text)
    if path is not None:
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
