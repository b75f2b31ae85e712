"""Scale-out on the embedded broker: one worker against two recommend workers sharing four
partitions, and the state hand-over when one of them leaves.

    python benchmarks/scaleout.py --events 12000 --json bench-out/scaleout.json

The catalogue (``--items`` synthetic items, ``benchmarks/e2e.py``'s) is embedded once by a seed
worker; each later worker starts from a copy of those vectors, since Qdrant Edge is embedded and
single-process. Then, each on a fresh broker with four partitions, in one run:

1. **one worker** (role ``all``): ``--events`` behaviour events published at once; throughput as
   in ``e2e.py --max``;
2. **ingest + one recommend worker** (two processes): the same load; what splitting the hops
   across processes buys by itself;
3. **ingest + two recommend workers** sharing the four partitions: the same load; then the
   hand-over: a second load is published and, once the workers are busy with it, one recommend
   worker is stopped (SIGTERM). Its partitions move to the other, which rebuilds their tables
   from the changelog. The hand-over time runs from the stop to the survivor owning all four
   partitions and being ready again.

After every configuration, each user's state is read back from the user-state changelog (the
newest record per user) and its count of applied events is compared with the events sent to that
user: fewer is lost state, more is duplicated state.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e import (
    WARM_UP,
    Workers,
    catalogue,
    embed_catalogue,
    end_offsets,
    load,
    measure,
    send_planned,
)
from latency import (
    BenchError,
    committed,
    embedded_stack,
    provenance,
    run_and_emit,
    running_worker,
)

from consumers.consumer import read_topic
from infra.broker import free_port
from infra.metrics import parse
from infra.settings import Settings
from models.state import UserState
from producers.producer import BehaviorProducer
from schemas.topics import BEHAVIOR, DEAD_LETTER, USER_UPDATES, TopicSpec
from streams.observe import LAG
from streams.spawn import spawn_worker, stop_process

READY_TIMEOUT_S = 180.0
SETTLE_S = 3.0


def seed_vectors(items: list[dict[str, Any]], keep: Path) -> float:
    """Embed the catalogue once (a worker of role all on a scratch broker); copy its vector store
    to ``keep``. Returns the seconds the embedding took."""
    with embedded_stack("recstream-scaleout-seed-") as (tmp, settings, _):
        with running_worker(settings, tmp) as (_, alive):
            seconds = embed_catalogue(settings, items, alive)
        shutil.copytree(settings.vectors_dir, keep)
    return seconds


class Fleet:
    """Worker processes on one broker, each with its own data directory and web port."""

    def __init__(self, settings: Settings, tmp: Path, vectors: Path) -> None:
        self.settings, self.tmp, self.vectors = settings, tmp, vectors
        self.procs: dict[str, tuple[Any, Path, str]] = {}  # name -> (process, log, url)

    def start(self, name: str, role: str) -> str:
        data = self.tmp / name
        if role != "ingest":
            shutil.copytree(
                self.vectors, data / self.settings.vectors_dir.relative_to(self.settings.data_dir)
            )
        port = free_port()
        log = self.tmp / f"{name}.log"
        env = {
            "RECSTREAM_DATA_DIR": str(data),
            "RECSTREAM_DEVICE": "cpu",
            "RECSTREAM_STREAM__WEB_PORT": str(port),
        }
        proc = spawn_worker(self.settings, log, role, **env)
        url = f"http://127.0.0.1:{port}"
        self.procs[name] = (proc, log, url)
        return url

    def alive(self) -> None:
        for name, (proc, log, _) in self.procs.items():
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-3000:]
                raise BenchError(f"worker {name} exited with {proc.returncode}:\n{tail}")

    def stop(self, name: str) -> None:
        proc, _, _ = self.procs.pop(name)
        stop_process(proc)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)

    def url(self, name: str) -> str:
        return self.procs[name][2]

    def pid(self, name: str) -> int:
        return int(self.procs[name][0].pid)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def owned(url: str) -> set[int]:
    """The user-update partitions a worker has assigned (its lag gauges name them)."""
    status, text = _get(url + "/metrics")
    if status != 200:
        return set()
    return {
        int(dict(labels)["partition"])
        for (name, labels) in parse(text)
        if name == LAG and ("topic", USER_UPDATES.name) in labels
    }


def wait_split(fleet: Fleet, names: Sequence[str], partitions: int) -> float:
    """Block until the named workers are ready and own every partition between them, each some
    and none twice; returns the seconds waited."""
    started = time.monotonic()
    while True:
        fleet.alive()
        try:
            ready = all(_get(fleet.url(n) + "/readyz")[0] == 200 for n in names)
            sets = [owned(fleet.url(n)) for n in names] if ready else []
        except OSError:
            ready, sets = False, []
        if (
            ready
            and all(sets)
            and sum(len(s) for s in sets) == partitions
            and len(set().union(*sets)) == partitions
        ):
            return time.monotonic() - started
        if time.monotonic() - started > READY_TIMEOUT_S:
            raise BenchError(f"workers {list(names)} did not split the partitions: {sets}")
        time.sleep(0.25)


def state_check(settings: Settings, group: str, sent: Counter[str]) -> dict[str, int]:
    """Each user's applied-event count from the newest user-state changelog record, against the
    events sent to that user."""
    spec = TopicSpec(f"{group}-user-state-changelog", "user_id", "compact", True, "")
    newest: dict[str, Any] = {}
    for msg in read_topic(settings, spec, timeout_s=5.0):
        key = json.loads(msg.key() or b'""')
        value = msg.value()
        newest[key] = None if value is None else json.loads(value)
    counts = {user: UserState.from_dict(value).events for user, value in newest.items()}
    lost = sum(max(0, n - counts.get(user, 0)) for user, n in sent.items())
    duplicated = sum(max(0, counts.get(user, 0) - n) for user, n in sent.items())
    missing = sum(1 for user in sent if user not in counts)
    return {
        "users": len(sent),
        "users_with_state": sum(1 for user in sent if user in counts),
        "users_missing": missing,
        "events_lost": lost,
        "events_duplicated": duplicated,
    }


@contextmanager
def fleet_on_fresh_broker(vectors: Path, prefix: str) -> Iterator[tuple[Settings, Fleet]]:
    with embedded_stack(prefix) as (tmp, settings, _), ExitStack() as stack:
        fleet = Fleet(settings, tmp, vectors)
        stack.callback(fleet.stop_all)
        yield settings, fleet


def configuration(
    name: str,
    roles: Sequence[tuple[str, str]],
    vectors: Path,
    args: argparse.Namespace,
    planned: list[Any],
    *,
    then: Callable[[Settings, Fleet, Counter[str]], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run ``planned`` through the workers ``roles`` ((name, role) pairs) on a fresh broker."""
    print(f"{name}: starting {len(roles)} worker(s)", file=sys.stderr, flush=True)
    with fleet_on_fresh_broker(vectors, "recstream-scaleout-") as (settings, fleet):
        for worker, role in roles:
            fleet.start(worker, role)
        recommenders = [w for w, role in roles if role in ("all", "recommend")]
        app = settings.stream.app_id
        one_app = all(role == "all" for _, role in roles)
        groups = (app, app) if one_app else (f"{app}-ingest", f"{app}-recommend")
        start_s = wait_split(fleet, recommenders, settings.kafka.partitions)
        time.sleep(SETTLE_S)
        workers = Workers(tuple(fleet.pid(w) for w, _ in roles), *groups)
        warm = load(random.Random(args.seed + 2), "warm", WARM_UP, args.users, args.items)
        result = measure(settings, args, fleet.alive, workers, warm=warm, planned=planned)
        sent = Counter(p.key for p in [*warm, *planned])
        result["partitions"] = settings.kafka.partitions
        result["start_s"] = round(start_s, 1)
        result["dead_lettered"] = end_offsets(settings, DEAD_LETTER.name)
        if then is not None:
            result["handover"] = then(settings, fleet, sent)
        result["state"] = state_check(settings, groups[1], sent)
    print(f"  {name}: {result['events_per_s']:,.0f} events/s", file=sys.stderr, flush=True)
    return result


def handover(args: argparse.Namespace) -> Callable[[Settings, Fleet, Counter[str]], dict]:
    """A second load; one recommend worker stopped while the fleet works on it."""

    def run(settings: Settings, fleet: Fleet, sent: Counter[str]) -> dict[str, Any]:
        rng = random.Random(args.seed + 1)
        more = load(rng, "handover", args.handover_events, args.users, args.items)
        sent.update(p.key for p in more)
        group = f"{settings.stream.app_id}-recommend"
        ingest = f"{settings.stream.app_id}-ingest"
        base = committed(settings, USER_UPDATES.name, group)
        forwarded = committed(settings, BEHAVIOR.name, ingest)
        with BehaviorProducer(settings, source="benchmark", linger_ms=5) as producer:
            for event in more:
                send_planned(producer, event)
            producer.flush()
        # The ingest hop packs several updates to a message: once it has forwarded the load,
        # the recommend workers are through it at the user-update topic's end.
        while committed(settings, BEHAVIOR.name, ingest) < forwarded + len(more):
            fleet.alive()
            time.sleep(0.1)
        end = end_offsets(settings, USER_UPDATES.name)
        # Stop one recommend worker once the fleet is a quarter through the second load.
        while committed(settings, USER_UPDATES.name, group) < base + (end - base) // 4:
            fleet.alive()
            time.sleep(0.1)
        moved = owned(fleet.url("recommend-2"))
        stopped_at = time.monotonic()
        fleet.stop("recommend-2")
        stop_s = time.monotonic() - stopped_at
        wait_split(fleet, ["recommend-1"], settings.kafka.partitions)
        handover_s = time.monotonic() - stopped_at
        deadline = time.monotonic() + 300
        while committed(settings, USER_UPDATES.name, group) < end:
            fleet.alive()
            if time.monotonic() > deadline:
                raise BenchError("the second load was not committed within 300 s")
            time.sleep(0.25)
        return {
            "events": len(more),
            "moved_partitions": sorted(moved),
            "stop_s": round(stop_s, 2),
            "handover_s": round(handover_s, 2),
        }

    return run


def run(args: argparse.Namespace) -> dict[str, Any]:
    items = catalogue(args.items, random.Random(args.seed))
    rng = random.Random(args.seed)
    planned = load(rng, "ev", args.events, args.users, args.items)
    with tempfile.TemporaryDirectory(prefix="recstream-scaleout-vectors-") as kept:
        keep = Path(kept) / "vectors"
        embed_s = seed_vectors(items, keep)
        print(f"catalogue of {len(items):,} items embedded in {embed_s:.0f} s", file=sys.stderr)
        configs = {
            "one worker": configuration("one worker", [("all", "all")], keep, args, planned),
            "ingest + one recommend": configuration(
                "ingest + one recommend",
                [("ingest", "ingest"), ("recommend-1", "recommend")],
                keep,
                args,
                planned,
            ),
            "ingest + two recommend": configuration(
                "ingest + two recommend",
                [("ingest", "ingest"), ("recommend-1", "recommend"), ("recommend-2", "recommend")],
                keep,
                args,
                planned,
                then=handover(args),
            ),
        }
    base = configs["one worker"]["events_per_s"]
    return {
        **provenance(),
        "items": args.items,
        "users": args.users,
        "events": args.events,
        "partitions": configs["one worker"]["partitions"],
        "catalogue_embed_s": round(embed_s, 1),
        "configurations": configs,
        "speedup_vs_one_worker": {
            name: round(c["events_per_s"] / base, 2) for name, c in configs.items()
        },
    }


def table(r: dict[str, Any]) -> str:
    lines = [
        f"recstream scale-out: {r['events']:,} behaviour events as fast as possible, "
        f"{r['users']:,} users, {r['items']:,} items, {r['partitions']} partitions, embedded "
        f"broker, cpu ({r['machine']['cpu_count']} cores)",
        f"{'':<26}{'events/s':>10}{'vs one':>8}{'CPU %':>8}{'RSS MiB':>9}"
        f"{'p50 s':>8}{'lost':>6}{'dup':>5}{'dead':>6}",
    ]
    for name, c in r["configurations"].items():
        state = c["state"]
        lines.append(
            f"{name:<26}{c['events_per_s']:>10,.0f}{r['speedup_vs_one_worker'][name]:>7.2f}x"
            f"{c['worker_cpu_percent']:>8.0f}{c['worker_rss_mib']:>9.0f}"
            f"{c['latency_ms']['p50'] / 1000:>8.1f}"
            f"{state['events_lost']:>6}{state['events_duplicated']:>5}{c['dead_lettered']:>6}"
        )
    hand = r["configurations"]["ingest + two recommend"]["handover"]
    lines.append("lost / dup: events missing from / counted twice in the users' state, read back")
    lines.append(
        f"hand-over: partitions {hand['moved_partitions']} moved in {hand['handover_s']} s after "
        f"the stop (worker shut down in {hand['stop_s']} s), {hand['events']:,} events in flight"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scaleout.py", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=12_000, help="events per configuration")
    parser.add_argument("--handover-events", type=int, default=4_000)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=1_000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if min(args.events, args.handover_events, args.items, args.users) <= 0:
        parser.error("counts must be positive")
    if args.json is not None and not args.json.parent.is_dir():
        parser.error(f"--json: no such directory: {args.json.parent}")
    args.max = True  # e2e.measure's all-at-once mode
    return run_and_emit("scaleout.py", run, table, args)


if __name__ == "__main__":
    sys.exit(main())
