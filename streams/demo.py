"""``recstream demo``: the embedded stack, the demo catalogue, simulated users and a live view.

It starts the broker in this process, the worker (role all) as a child process and the web console
(:mod:`streams.console`) on loopback, printing its address; publishes the shipped catalogue, waits
until the encoder has embedded it, then plays simulated users with distinct tastes and redraws each
user's latest recommendations (with reasons) as they arrive. Ctrl-C, or ``--duration``, stops
everything: the console, the worker by its pid, then the broker.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from consumers.consumer import RecommendationConsumer
from infra.broker import EmbeddedBroker, free_port
from infra.cli import UserError, load_cli_settings
from infra.kafka import group_progress, provision_topics
from infra.settings import Settings
from producers.demo.data import catalog, personas
from producers.producer import BehaviorProducer
from schemas.events import RecommendationEvent
from schemas.topics import ENCODE_REQUESTS
from streams.spawn import spawn_worker, stop_process

WORKER_GROUP = "recstream"
KINDS = (("view", 0.5), ("click", 0.3), ("add_to_cart", 0.1), ("purchase", 0.07), ("review", 0.03))
OPENING = ("dev", ["scifi-001", "scifi-002", "scifi-003"])  # three sci-fi clicks, shown first
SHOWN = 5


@dataclass
class View:
    """What the terminal shows: each persona's latest list and the last few events."""

    titles: dict[str, str]
    people: list[dict[str, Any]]
    latest: dict[str, RecommendationEvent] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)

    def render(self) -> str:
        lines = ["recstream demo — live recommendations (Ctrl-C stops)", ""]
        for person in self.people:
            rec = self.latest.get(person["user_id"])
            lines.append(f"{person['name']} ({person['user_id']}): {person['description']}")
            if rec is None:
                lines.append("    (waiting for a first list)")
            else:
                lines.append(
                    f"    list after event {rec.trigger_event_id[:12]}, "
                    f"{rec.latency_ms:.0f} ms after it was published"
                )
                for item in rec.items[:SHOWN]:
                    title = self.titles.get(item.item_id, item.item_id)
                    lines.append(
                        f"    {item.rank:>2}. {item.item_id:<11} {title[:38]:<38} "
                        f"— {item.reasons[0]}"
                    )
            lines.append("")
        lines.append("recent events: " + "; ".join(self.events[-4:]))
        return "\n".join(lines)

    def line(self, rec: RecommendationEvent) -> str:
        """One list on one line, for output that is not a terminal."""
        top = "; ".join(f"{i.item_id} ({i.reasons[0]})" for i in rec.items[:3])
        return f"{rec.user_id} [{rec.latency_ms:.0f} ms]: {top}"


def _wait_embedded(
    settings: Settings,
    total: int,
    worker: subprocess.Popen[bytes],
    out: TextIO,
    timeout_s: float = 300.0,
) -> None:
    deadline = time.monotonic() + timeout_s
    done, shown = 0, -1
    while done < total:
        if worker.poll() is not None:
            raise UserError(f"the worker exited; see {settings.data_dir / 'worker.log'}")
        if time.monotonic() > deadline:
            raise UserError(f"the catalogue was not embedded within {timeout_s:.0f} s")
        try:
            done, _ = group_progress(settings.kafka, WORKER_GROUP, ENCODE_REQUESTS.name)
        except Exception:  # noqa: BLE001 - the worker's group may not exist yet
            done = 0
        if done != shown:
            print(
                f"\rembedding the catalogue: {min(done, total)}/{total} items",
                end="",
                file=out,
                flush=True,
            )
            shown = done
        time.sleep(0.5)
    print(file=out)


def _simulate(
    producer: BehaviorProducer,
    rng: random.Random,
    people: list[dict[str, Any]],
    by_prefix: dict[str, list[str]],
    view: View,
) -> None:
    person = rng.choice(people)
    item_id = rng.choice(by_prefix[rng.choice(person["likes"])])
    kind = rng.choices([k for k, _ in KINDS], weights=[w for _, w in KINDS])[0]
    title = view.titles[item_id]
    if kind == "review":
        producer.review(
            person["user_id"],
            item_id,
            f"{title} is exactly my kind of thing; I keep coming back to it.",
            5.0,
        )
    else:
        getattr(producer, kind)(person["user_id"], item_id)
    view.events.append(f"{person['user_id']} {kind} {item_id}")


def _play(
    settings: Settings,
    view: View,
    rate: float,
    until: float,
    draw: Callable[[RecommendationEvent], None],
) -> None:
    rng = random.Random(7)
    items = catalog()
    by_prefix: dict[str, list[str]] = {}
    for item in items:
        by_prefix.setdefault(item["item_id"].split("-")[0] + "-", []).append(item["item_id"])
    with (
        BehaviorProducer(settings, source="demo") as producer,
        RecommendationConsumer(settings, from_beginning=False) as recs,
    ):
        user, clicks = OPENING
        for item_id in clicks:
            producer.click(user, item_id)
            view.events.append(f"{user} click {item_id}")
        producer.flush()
        next_event = time.monotonic() + 1.0 / rate
        while time.monotonic() < until:
            rec = recs.poll(0.1)
            if rec is not None:
                view.latest[rec.user_id] = rec
                draw(rec)
            if time.monotonic() >= next_event:
                _simulate(producer, rng, view.people, by_prefix, view)
                next_event += 1.0 / rate


def _open_console(settings: Settings, worker_url: str, port: int | None, out: TextIO) -> Any:
    """The demo's console on loopback: on ``port``, or on console.port falling back to any free
    port when that one is taken."""
    from streams.console import start_console

    chosen = settings.console.port if port is None else port
    try:
        server = start_console(settings, host="127.0.0.1", port=chosen, worker_urls=[worker_url])
    except UserError:
        if port is not None:
            raise
        print(f"port {chosen} is taken; the console takes a free one", file=out)
        server = start_console(settings, host="127.0.0.1", port=0, worker_urls=[worker_url])
    url = server.url
    print(f"console: {url}  (storefront; {url}ops operations; {url}eval evaluation)", file=out)
    return server


def run_demo(
    settings: Settings,
    port: int,
    duration: float | None,
    rate: float,
    out: TextIO,
    *,
    console_port: int | None = None,
    console: bool = True,
) -> int:
    items = catalog()
    view = View({i["item_id"]: i["title"] for i in items}, personas())
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    live = out.isatty()

    def draw(rec: RecommendationEvent) -> None:
        if live:
            print("\x1b[2J\x1b[H" + view.render(), file=out, flush=True)
        else:
            print(view.line(rec), file=out, flush=True)

    with EmbeddedBroker(port=port or None, log_file=settings.data_dir / "broker.log") as broker:
        settings = settings.model_copy(
            update={
                "kafka": settings.kafka.model_copy(
                    update={"bootstrap_servers": broker.bootstrap_servers}
                )
            }
        )
        provision_topics(settings.kafka)
        print(
            f"broker on {broker.bootstrap_servers}; worker log in "
            f"{settings.data_dir / 'worker.log'}",
            file=out,
        )
        web_port = free_port()
        worker = spawn_worker(
            settings, settings.data_dir / "worker.log", RECSTREAM_STREAM__WEB_PORT=str(web_port)
        )
        server = None
        try:
            if console:
                server = _open_console(settings, f"http://127.0.0.1:{web_port}", console_port, out)
            with BehaviorProducer(settings, source="demo") as producer:
                for item in items:
                    producer.send_dict(item)
            _wait_embedded(settings, len(items), worker, out)
            until = time.monotonic() + duration if duration else float("inf")
            with contextlib.suppress(KeyboardInterrupt):
                _play(settings, view, rate, until, draw)
        finally:
            if server is not None:
                server.stop()
            stop_process(worker)
    print(view.render(), file=out)
    return 0


def cli_demo(args: argparse.Namespace) -> int:
    if args.data_dir is None:
        args.data_dir = Path(".data") / "demo"
    settings = load_cli_settings(args)
    return run_demo(
        settings,
        args.port,
        args.duration,
        args.rate,
        sys.stdout,
        console_port=args.console_port,
        console=not args.no_console,
    )
