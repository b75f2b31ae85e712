"""A bounded soak of the embedded stack: one worker's memory, lag and latency over time.

    python benchmarks/soak.py --rate 100 --duration 1200 --users 1000 --items 10000 --window 30 \
        --json bench-out/soak.json --plot docs/img/soak.png

On a fresh embedded broker it starts one worker (role ``all``, MiniLM on the CPU), publishes
``benchmarks/e2e.py``'s synthetic catalogue of ``--items`` items, waits until every item is
embedded, warms up, then plays behaviour events of ``--users`` users at ``--rate`` events/s for
``--duration`` s, open loop: event i is due at t0 + i/rate and its latency runs from that due time
to its recommendation, as in ``latency.py`` and ``e2e.py``.

At the end of every ``--window`` s it samples the worker's resident memory and CPU share, the lag
of the worker's consumer group on the behaviour topic and on the user-updates topic (end offsets
minus committed), the events sent and the dead letters so far; each window also gets the lists that
arrived in it and their latency percentiles. A last row, ``drain``, is taken once the stragglers
have arrived. The summary has the totals (sent, recommended, coalesced, lost: as in ``e2e.py``),
the overall latency, RSS at start and end with its least-squares slope over the windows after the
first two (settling), the largest lag, and the comparison measured in the same run: the first
``--compare`` windows after settling beside the last ones. It prints a table, writes JSON
(``--json``) and a PNG of three stacked panels (``--plot``): RSS, lag, latency p50/p99.

If the worker exits during the load, or on Ctrl-C, it stops the load, still reports and writes
what it measured (``complete: false``) and exits non-zero with one line.
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from confluent_kafka import KafkaException
from e2e import Usage, catalogue, embed_catalogue, end_offsets, load
from latency import (
    LINGER_MS,
    STRAGGLER_S,
    BenchError,
    Collector,
    Planned,
    _Parser,
    _positive,
    _recommendation,
    await_arrivals,
    embedded_stack,
    emit,
    open_loop,
    percentiles,
    phase_result,
    provenance,
    running_worker,
)

from infra.broker import BrokerStartError
from infra.kafka import consumer_lag
from infra.logs import configure_logging
from infra.settings import Settings
from producers.producer import BehaviorProducer
from schemas.topics import BEHAVIOR, DEAD_LETTER, RECOMMENDATIONS, USER_UPDATES

SETTLE_WINDOWS = 2  # left out of the RSS slope and the comparison: caches and tables still fill
WARMUP_EVENTS = 200  # as e2e.py
WARMUP_RATE = 100.0
WARMUP_TIMEOUT_S = 120.0
OPEN_LOOP_LEAD_S = 0.05  # latency.open_loop's event 0 is due this long after it is called
COMMIT_WAIT_S = 10.0  # after the stragglers: time for the worker's offset commits to catch up
TICK_S = 0.25


class WorkerDied(Exception):
    """The worker exited during the run; reported as one line (its log is kept beside --json)."""


class _Halted(Exception):
    """Raised from the send callback to end :func:`latency.open_loop` early."""


def _checked(alive: Callable[[], None]) -> Callable[[], None]:
    """``running_worker``'s liveness check, raising :class:`WorkerDied` instead of BenchError
    (which would print the worker's log tail)."""

    def check() -> None:
        try:
            alive()
        except BenchError as exc:
            raise WorkerDied(str(exc)) from None

    return check


# -- sampling ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """The worker and its consumer group at one moment (``taken``, monotonic)."""

    taken: float
    usage: Usage
    lag_behavior: int | None
    lag_updates: int | None
    sent: int
    dead_letters: int


def group_lag(settings: Settings, topic: str) -> int | None:
    """End offsets minus the worker's group's commits on ``topic``; None if it cannot be read."""
    try:
        return consumer_lag(settings.kafka, settings.stream.app_id, topic)
    except (KafkaException, KeyError):
        return None


def take(settings: Settings, pid: int, sent: int, alive: Callable[[], None]) -> Sample:
    alive()
    taken = time.monotonic()
    try:
        usage = Usage.of(pid)
    except (OSError, KeyError, IndexError):  # gone between the check and the read
        raise WorkerDied(f"the worker's /proc/{pid} entry vanished") from None
    return Sample(
        taken,
        usage,
        group_lag(settings, BEHAVIOR.name),
        group_lag(settings, USER_UPDATES.name),
        sent,
        end_offsets(settings, DEAD_LETTER.name),
    )


class Sender(threading.Thread):
    """Plays the planned events with :func:`latency.open_loop` in the background; can be halted."""

    def __init__(self, producer: BehaviorProducer, planned: Sequence[Planned], rate: float) -> None:
        super().__init__(name="soak-sender", daemon=True)
        self._producer = producer
        self.planned = planned
        self.rate = rate
        self._halt = threading.Event()
        self.sent = 0
        self.started = 0.0
        self.due: dict[str, float] | None = None
        self.achieved: float | None = None
        self.error: str | None = None

    def start(self) -> None:
        self.started = time.monotonic()
        super().start()

    @property
    def t0(self) -> float:
        """When event 0 was due: the start of window 1."""
        return self.started + OPEN_LOOP_LEAD_S

    def run(self) -> None:
        try:
            self.due, self.achieved = open_loop(self.planned, self.rate, self._send, "soak")
            self._producer.flush()
        except _Halted:
            pass
        except (BufferError, KafkaException) as exc:  # the local queue stayed full, or the broker
            self.error = f"sending stopped after {self.sent:,} events: {type(exc).__name__}: {exc}"

    def _send(self, event: Planned) -> None:
        if self._halt.is_set():
            raise _Halted
        getattr(self._producer, event.kind)(event.key, event.item_id, event_id=event.event_id)
        self.sent += 1

    def halt(self) -> None:
        self._halt.set()
        self.join(timeout=30)

    def due_times(self) -> dict[str, float]:
        """Each sent event's due time: open_loop's own, or t0 + i/rate if it was halted."""
        if self.due is not None:
            return self.due
        return {
            e.event_id: self.t0 + i / self.rate for i, e in enumerate(self.planned[: self.sent])
        }


def wait_until(at: float, alive: Callable[[], None]) -> None:
    while (left := at - time.monotonic()) > 0:
        alive()
        time.sleep(min(TICK_S, left))


def wait_commits(settings: Settings, alive: Callable[[], None]) -> None:
    """Until the worker's group has committed everything on both hops, or COMMIT_WAIT_S."""
    deadline = time.monotonic() + COMMIT_WAIT_S
    while time.monotonic() < deadline:
        alive()
        if group_lag(settings, BEHAVIOR.name) == 0 == group_lag(settings, USER_UPDATES.name):
            return
        time.sleep(0.5)


@dataclass
class Played:
    """The samples of one soak: at the start, at each window's end, after the drain."""

    bounds: list[float]  # t0, then each window's end (monotonic)
    samples: list[Sample]  # samples[k] ends window k; samples[0] is the start
    drain: Sample | None
    stopped: str | None
    stopped_at: float | None = None  # monotonic


def play(
    settings: Settings,
    args: argparse.Namespace,
    sender: Sender,
    collector: Collector,
    *,
    pid: int,
    alive: Callable[[], None],
) -> Played:
    """Start the sender, sample at every window's end, then wait for the stragglers."""
    played = Played([], [take(settings, pid, 0, alive)], None, None)
    sender.start()
    count = math.ceil(args.duration / args.window)
    played.bounds = [sender.t0 + min(k * args.window, args.duration) for k in range(count + 1)]
    try:
        for k, end in enumerate(played.bounds[1:], 1):
            wait_until(end, alive)
            played.samples.append(take(settings, pid, sender.sent, alive))
            arrived = collector.snapshot()[0]
            sent = sender.planned[: played.samples[-1].sent]
            lists = sum(1 for e in sent if e.event_id in arrived)
            progress(k, count, played.samples[-1], lists)
        sender.join()
        if sender.error is not None:
            raise WorkerDied(sender.error)  # stops the soak the same way
        await_arrivals(collector, sender.planned, STRAGGLER_S, alive)
        wait_commits(settings, alive)
        played.drain = take(settings, pid, sender.sent, alive)
    except WorkerDied as exc:
        played.stopped = str(exc)
    except KafkaException as exc:  # sampling could not reach the broker
        played.stopped = f"the broker did not answer: {exc}"
    except KeyboardInterrupt:
        played.stopped = "interrupted (Ctrl-C)"
    finally:
        sender.halt()
    if played.stopped is not None:
        played.stopped_at = time.monotonic()
    return played


def progress(k: int, count: int, s: Sample, lists: int) -> None:
    print(
        f"  window {k}/{count}: RSS {s.usage.rss_mib:.0f} MiB, lag {s.lag_behavior}/"
        f"{s.lag_updates}, {s.sent:,} sent, {lists:,} lists, {s.dead_letters} dead letters",
        file=sys.stderr,
        flush=True,
    )


# -- figures -----------------------------------------------------------------------------------


class Latencies:
    """Each answered event's latency (ms), ordered by when its list arrived, to cut by window."""

    def __init__(self, due: dict[str, float], arrived: dict[str, float]) -> None:
        pairs = sorted(
            (arrived[i], (arrived[i] - at) * 1000.0) for i, at in due.items() if i in arrived
        )
        self._at = np.array([p[0] for p in pairs], dtype=float)
        self._ms = np.array([p[1] for p in pairs], dtype=float)

    def between(self, lo: float, hi: float) -> list[float]:
        a, b = np.searchsorted(self._at, [lo, hi], side="left")
        return [float(v) for v in self._ms[a:b]]


def row(
    name: int | str, prev: Sample, cur: Sample, lat: Latencies, *, lo: float, hi: float, t0: float
) -> dict[str, Any]:
    """One window: ``cur`` against ``prev``, lists that arrived in [lo, hi), ``end_s`` from t0."""
    ms = lat.between(lo, hi)
    cpu = 100.0 * (cur.usage.cpu_s - prev.usage.cpu_s) / max(cur.taken - prev.taken, 1e-9)
    return {
        "window": name,
        "end_s": round(hi - t0, 1),
        "rss_mib": round(cur.usage.rss_mib, 1),
        "cpu_percent": round(cpu, 1),
        "lag_behavior": cur.lag_behavior,
        "lag_user_updates": cur.lag_updates,
        "sent": cur.sent - prev.sent,
        "recommended": len(ms),
        "latency_ms": percentiles(ms),
        "dead_letters": cur.dead_letters,
    }


def side(rows: Sequence[dict[str, Any]], bounds: list[float], lat: Latencies) -> dict[str, Any]:
    """One side of the comparison: windows pooled (latency over all their events)."""
    first, last = rows[0]["window"], rows[-1]["window"]
    pooled = percentiles(lat.between(bounds[first - 1], bounds[last]))
    lags = [r["lag_behavior"] for r in rows if r["lag_behavior"] is not None]
    return {
        "windows": [first, last],
        "rss_mib": round(float(np.mean([r["rss_mib"] for r in rows])), 1),
        "cpu_percent": round(float(np.mean([r["cpu_percent"] for r in rows])), 1),
        "latency_p50_ms": pooled["p50"],
        "latency_p99_ms": pooled["p99"],
        "max_lag_behavior": max(lags, default=None),
    }


def compare(
    rows: list[dict[str, Any]], bounds: list[float], lat: Latencies, k: int
) -> dict[str, Any] | None:
    """The first ``k`` windows after settling beside the last ``k``; None if they would overlap."""
    if len(rows) < SETTLE_WINDOWS + 2 * k:
        return None
    early = side(rows[SETTLE_WINDOWS : SETTLE_WINDOWS + k], bounds, lat)
    late = side(rows[-k:], bounds, lat)
    drift = {
        key: round(late[key] - early[key], 2)
        for key in early
        if key != "windows" and early[key] is not None and late[key] is not None
    }
    return {"early": early, "late": late, "drift": drift}


def rss_fit(rows: Sequence[dict[str, Any]]) -> tuple[float, float] | None:
    """RSS (MiB) against end_s, least squares over the windows after settling: (slope per s,
    intercept); None with fewer than two such windows."""
    kept = rows[SETTLE_WINDOWS:]
    if len(kept) < 2:
        return None
    slope, intercept = np.polyfit([r["end_s"] for r in kept], [r["rss_mib"] for r in kept], 1)
    return float(slope), float(intercept)


def summarise(played: Played, sender: Sender, collector: Collector, k: int) -> dict[str, Any]:
    due = sender.due_times()
    sent = sender.planned[: sender.sent]
    phase = phase_result(sent, due, collector, sender.achieved)
    arrived, _ = collector.snapshot()
    lat, b, s = Latencies(due, arrived), played.bounds, played.samples
    rows = [row(i, s[i - 1], s[i], lat, lo=b[i - 1], hi=b[i], t0=b[0]) for i in range(1, len(s))]
    drain, fit = played.drain, rss_fit(rows)
    lags = {
        topic: [r[f"lag_{topic}"] for r in rows if r[f"lag_{topic}"] is not None]
        for topic in ("behavior", "user_updates")
    }
    return {
        "complete": played.stopped is None,
        "stopped": played.stopped,
        "stopped_at_s": None if played.stopped_at is None else round(played.stopped_at - b[0], 1),
        "achieved_send_rate": None if sender.achieved is None else round(sender.achieved, 1),
        "sent": len(sent),
        "recommended": len(phase.latency_ms),
        "coalesced": phase.coalesced,
        "lost": phase.lost,
        "dead_lettered": (drain or s[-1]).dead_letters - s[0].dead_letters,
        "latency_ms": percentiles(phase.latency_ms),
        "worker_latency_ms": percentiles(phase.extra_ms),
        "rss_start_mib": round(s[0].usage.rss_mib, 1),
        "rss_end_mib": round(s[-1].usage.rss_mib, 1),
        "rss_peak_mib": round(s[-1].usage.peak_rss_mib, 1),
        "rss_slope_mib_per_10min": None if fit is None else round(fit[0] * 600.0, 2),
        "max_lag_behavior": max(lags["behavior"], default=None),
        "max_lag_user_updates": max(lags["user_updates"], default=None),
        "comparison": compare(rows, b, lat, k),
        "windows": rows,
        "drain": None
        if drain is None
        else row("drain", s[-1], drain, lat, lo=b[-1], hi=drain.taken, t0=b[0]),
    }


# -- the run -----------------------------------------------------------------------------------


def measure(
    settings: Settings, args: argparse.Namespace, alive: Callable[[], None], pid: int
) -> dict[str, Any]:
    """Warm up, then the soak; its windows and summary."""
    rng = random.Random(args.seed)
    tag = uuid.uuid4().hex[:6]
    warm = load(rng, f"warm-{tag}", WARMUP_EVENTS, args.users, args.items)
    planned = load(rng, f"ev-{tag}", int(args.rate * args.duration), args.users, args.items)
    collector = Collector(settings, RECOMMENDATIONS.name, _recommendation)
    collector.start()
    collector.ready.wait(10)
    try:
        with BehaviorProducer(settings, source="benchmark", linger_ms=LINGER_MS) as producer:

            def send(event: Planned) -> None:
                getattr(producer, event.kind)(event.key, event.item_id, event_id=event.event_id)

            open_loop(warm, WARMUP_RATE, send, "warm-up")
            producer.flush()
            await_arrivals(collector, warm, WARMUP_TIMEOUT_S, alive)
            sender = Sender(producer, planned, args.rate)
            played = play(settings, args, sender, collector, pid=pid, alive=alive)
            failed = producer.failed
        return {**summarise(played, sender, collector, args.compare), "failed_deliveries": failed}
    finally:
        collector.halt()


def keep_log(workdir: Path, json_path: Path | None) -> str | None:
    """Copy the worker's log out of the temporary directory, beside the JSON output."""
    if json_path is None:
        return None
    kept = json_path.with_suffix(".worker.log")
    shutil.copyfile(workdir / "worker.log", kept)  # running_worker's log file
    return str(kept)


def run(args: argparse.Namespace) -> dict[str, Any]:
    with (
        embedded_stack("recstream-soak-") as (tmp, settings, _),
        running_worker(settings, tmp) as (worker, alive_or_bench_error),
    ):
        alive = _checked(alive_or_bench_error)
        try:
            items = catalogue(args.items, random.Random(args.seed))
            embed_s = embed_catalogue(settings, items, alive)
            print(
                f"  catalogue of {len(items):,} items embedded in {embed_s:.0f} s", file=sys.stderr
            )
            result = measure(settings, args, alive, worker.pid)
        except WorkerDied as exc:
            kept = keep_log(tmp, args.json)
            raise WorkerDied(f"{exc}" + (f" (its log: {kept})" if kept else "")) from None
        died = worker.poll() is not None
        result["worker_log"] = keep_log(tmp, args.json) if died else None
    return {
        **provenance(),
        "rate": args.rate,
        "duration_s": args.duration,
        "window_s": args.window,
        "users": args.users,
        "items": args.items,
        "partitions": settings.kafka.partitions,
        "settle_windows": SETTLE_WINDOWS,
        "compare_windows": args.compare,
        "catalogue_embed_s": round(embed_s, 1),
        **result,
    }


# -- reporting ---------------------------------------------------------------------------------


def _cell(value: float | None, width: int, fmt: str = ".1f") -> str:
    return f"{'-' if value is None else format(value, fmt):>{width}}"


def table_rows(r: dict[str, Any]) -> list[str]:
    head = (
        f"{'window':>6}{'end s':>8}{'RSS MiB':>9}{'CPU %':>7}{'lag beh':>9}{'lag upd':>9}"
        f"{'sent':>7}{'lists':>7}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}{'dead':>6}"
    )
    lines = [head]
    for w in r["windows"] + ([r["drain"]] if r["drain"] else []):
        lat = w["latency_ms"]
        lines.append(
            f"{w['window']:>6}{w['end_s']:>8.0f}{w['rss_mib']:>9.1f}{w['cpu_percent']:>7.0f}"
            f"{_cell(w['lag_behavior'], 9, 'd')}{_cell(w['lag_user_updates'], 9, 'd')}"
            f"{w['sent']:>7}{w['recommended']:>7}"
            + "".join(_cell(lat[p], 9) for p in ("p50", "p95", "p99", "max"))
            + f"{w['dead_letters']:>6}"
        )
    return lines


def comparison_rows(c: dict[str, Any] | None) -> list[str]:
    if c is None:
        return ["early vs late: too few windows to compare"]
    early, late, drift = c["early"], c["late"], c["drift"]
    names = {
        "rss_mib": "RSS MiB (mean)",
        "cpu_percent": "CPU % (mean)",
        "latency_p50_ms": "latency p50 ms",
        "latency_p99_ms": "latency p99 ms",
        "max_lag_behavior": "lag behaviour (max)",
    }
    e, la = early["windows"], late["windows"]
    lines = [
        f"{'':<22}{f'early (w{e[0]}-{e[1]})':>18}{f'late (w{la[0]}-{la[1]})':>18}{'drift':>10}"
    ]
    for key, name in names.items():
        d = drift.get(key)
        lines.append(
            f"{name:<22}{_cell(early[key], 18)}{_cell(late[key], 18)}{_cell(d, 10, '+.1f')}"
        )
    return lines


def table(r: dict[str, Any]) -> str:
    lat, slope = r["latency_ms"], r["rss_slope_mib_per_10min"]
    status = [] if r["complete"] else [f"INCOMPLETE: {r['stopped']}"]
    return "\n".join(
        [
            f"recstream soak: {r['rate']:g} events/s for {r['duration_s']:g} s "
            f"(achieved {r['achieved_send_rate'] or '-'}/s), {r['users']:,} users, "
            f"{r['items']:,} items, "
            f"{r['partitions']} partitions, one worker (role all), embedded broker, cpu; "
            f"windows of {r['window_s']:g} s",
            *status,
            *table_rows(r),
            f"sent {r['sent']:,}, recommended {r['recommended']:,}, coalesced {r['coalesced']:,}, "
            f"lost {r['lost']}, dead-lettered {r['dead_lettered']}, "
            f"failed deliveries {r['failed_deliveries']}",
            f"latency ms (from due time): p50 {lat['p50']}, p95 {lat['p95']}, p99 {lat['p99']}, "
            f"max {lat['max']}",
            f"worker RSS {r['rss_start_mib']} MiB at start, {r['rss_end_mib']} MiB at end "
            f"(peak {r['rss_peak_mib']}); slope "
            f"{'-' if slope is None else f'{slope:+.1f}'} MiB per 10 min "
            f"(least squares, windows after the first {r['settle_windows']})",
            f"max lag: behaviour {r['max_lag_behavior']}, user-updates {r['max_lag_user_updates']}",
            *comparison_rows(r["comparison"]),
        ]
    )


def plot(r: dict[str, Any], path: Path) -> None:
    """Three stacked panels over time: worker RSS, consumer lag, latency p50/p99."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, lag, lat) = plt.subplots(3, 1, sharex=True, figsize=(9, 8))
    try:
        _rss_panel(mem, r)
        _series(lag, r, "behaviour", lambda w: w["lag_behavior"])
        _series(lag, r, "user-updates", lambda w: w["lag_user_updates"])
        lag.set_ylim(bottom=0)
        lag.set_ylabel("consumer lag (messages)")
        _series(lat, r, "p50", lambda w: w["latency_ms"]["p50"])
        _series(lat, r, "p99", lambda w: w["latency_ms"]["p99"])
        lat.set_ylim(bottom=0)
        lat.set_ylabel("latency from due time (ms)")
        lat.set_xlabel("minutes since the load started (a point at the end of each window)")
        _spans((mem, lag, lat), r)
        mem.set_title(
            f"recstream soak: {r['rate']:g} events/s, {r['users']:,} users, {r['items']:,} items, "
            f"windows of {r['window_s']:g} s" + ("" if r["complete"] else " (INCOMPLETE)"),
            fontsize="medium",
        )
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=100)
    finally:
        plt.close(fig)


def _series(
    ax: Any, r: dict[str, Any], label: str, get: Callable[[dict[str, Any]], float | None]
) -> None:
    """One line over the windows; a window without a value (no lists in it) leaves a gap."""
    minutes = [w["end_s"] / 60.0 for w in r["windows"]]
    values = [math.nan if (v := get(w)) is None else float(v) for w in r["windows"]]
    ax.plot(minutes, values, marker="o", ms=3, label=label)


def _rss_panel(ax: Any, r: dict[str, Any]) -> None:
    """RSS from the start sample on, the fitted line, and at least a 10% span of the level so
    that noise of a few MiB does not fill the panel."""
    rows = r["windows"]
    minutes = [0.0] + [w["end_s"] / 60.0 for w in rows]
    rss = [r["rss_start_mib"]] + [w["rss_mib"] for w in rows]
    ax.plot(minutes, rss, marker="o", ms=3, label="worker RSS")
    fit = rss_fit(rows)
    if fit is not None:
        xs = [w["end_s"] for w in rows[r["settle_windows"] :]]
        label = f"fit: {r['rss_slope_mib_per_10min']:+.1f} MiB per 10 min"
        ax.plot(
            [x / 60 for x in xs], [fit[0] * x + fit[1] for x in xs], "--", color="0.3", label=label
        )
    middle, half = (max(rss) + min(rss)) / 2, max(max(rss) - min(rss), 0.1 * max(rss)) / 2 * 1.1
    ax.set_ylim(middle - half, middle + half)
    ax.set_ylabel("worker RSS (MiB)")


def _spans(axes: Sequence[Any], r: dict[str, Any]) -> None:
    """Shade the settling windows, and the early and late windows the comparison pools."""
    ends = [0.0] + [w["end_s"] / 60.0 for w in r["windows"]]
    settle = min(r["settle_windows"], len(ends) - 1)
    c = r["comparison"]
    spans = [(0, settle, "0.5", "settling")]
    if c is not None:
        spans += [
            (c[side]["windows"][0] - 1, c[side]["windows"][1], colour, side)
            for side, colour in (("early", "tab:green"), ("late", "tab:purple"))
        ]
    for i, ax in enumerate(axes):
        for lo, hi, colour, label in spans:
            ax.axvspan(
                ends[lo], ends[hi], color=colour, alpha=0.15, lw=0, label=label if i == 0 else None
            )
        if r["stopped_at_s"] is not None:
            label = "stopped" if i == 0 else None
            ax.axvline(r["stopped_at_s"] / 60.0, color="tab:red", ls="--", label=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="upper left", ncols=3)


# -- command line ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="soak.py", description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=_positive(float), default=100.0, help="events per second")
    parser.add_argument("--duration", type=_positive(float), default=1200.0, help="seconds of load")
    parser.add_argument("--window", type=_positive(float), default=30.0, help="seconds per sample")
    parser.add_argument("--users", type=_positive(int), default=1_000, help="distinct users")
    parser.add_argument("--items", type=_positive(int), default=10_000, help="catalogue size")
    parser.add_argument(
        "--compare", type=_positive(int), default=2, help="windows on each side of early vs late"
    )
    parser.add_argument("--seed", type=int, default=11, help="seed of the catalogue and the load")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--plot", type=Path, help="also draw RSS, lag and latency to this PNG")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None and not path.parent.is_dir():
            parser.error(f"{flag}: no such directory: {path.parent}")
    windows = math.ceil(args.duration / args.window)
    if windows < SETTLE_WINDOWS + 2 * args.compare:
        parser.error(
            f"--duration {args.duration:g} gives {windows} windows of {args.window:g} s; "
            f"need {SETTLE_WINDOWS + 2 * args.compare} ({SETTLE_WINDOWS} settling, then "
            f"--compare {args.compare} early and {args.compare} late)"
        )
    configure_logging("warning")
    try:
        result = run(args)
    except (WorkerDied, BenchError, BrokerStartError) as exc:
        print(f"soak.py: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("soak.py: interrupted", file=sys.stderr)
        return 130
    emit(table(result), result, args.json)
    if args.plot is not None:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    if result["stopped"] is not None:
        log = f" (its log: {result['worker_log']})" if result["worker_log"] else ""
        print(f"soak.py: error: stopped early: {result['stopped']}{log}", file=sys.stderr)
        return 130 if result["stopped"].startswith("interrupted") else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
