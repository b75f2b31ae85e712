"""Replay an event log through the embedded stack and scrape the worker's ``GET /metrics``.

Starts the embedded broker and one worker (role all, web server on a free loopback port) in a
temp dir, replays the log at full speed, waits until the worker has committed every input and
every internal message, then scrapes ``/metrics`` once. It prints the figures the scrape gives
beside the same figures counted from the topics in the same run (events sent by the replay,
lists on the recommendation topic), and writes both, with the raw scrape, as JSON.

    python benchmarks/scrape.py LOG [--limit N] [--json OUT.json] [--text OUT.txt]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import polars as pl

from consumers.consumer import read_topic
from infra.broker import EmbeddedBroker, free_port
from infra.kafka import group_progress, provision_topics
from infra.logs import configure_logging
from infra.metrics import Scrape, parse
from infra.settings import load_settings
from producers.replay import replay
from schemas.topics import ENCODE_REQUESTS, INPUT_TOPICS, RECOMMENDATIONS, USER_UPDATES
from streams.observe import DEAD_LETTERS, EVENTS, LATENCY
from streams.observe import RECOMMENDATIONS as LISTS
from streams.spawn import spawn_worker, stop_process


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except OSError:
        return 0, ""


def total(samples: Scrape, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)


def quantile(samples: Scrape, name: str, q: float) -> float:
    """The upper bound of the bucket that holds quantile ``q`` of a histogram."""
    buckets = sorted(
        (float(dict(lab)["le"]), v) for (n, lab), v in samples.items() if n == f"{name}_bucket"
    )
    count = buckets[-1][1] if buckets else 0.0
    for bound, cumulative in buckets:
        if cumulative >= q * count:
            return bound
    return float("nan")


def run(log: Path, limit: int | None, work: Path) -> tuple[str, int, float, int, int]:
    """Replay ``log`` through a fresh embedded stack in ``work``; the scrape, its HTTP status,
    the seconds until everything was committed, events replayed and lists on the topic."""
    log_path = log
    if limit is not None:
        log_path = work / "log.parquet"
        pl.read_parquet(log).sort("ts").head(limit).write_parquet(log_path)
    with EmbeddedBroker(log_file=work / "broker.log") as broker:
        settings = load_settings(
            data_dir=work / "data", kafka={"bootstrap_servers": broker.bootstrap_servers}
        )
        provision_topics(settings.kafka)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {"RECSTREAM_STREAM__WEB_PORT": str(port), "RECSTREAM_DEVICE": "cpu"}
        worker = spawn_worker(settings, work / "worker.log", **env)
        try:
            deadline = time.monotonic() + 180
            while _get(url + "/readyz")[0] != 200:
                if worker.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((work / "worker.log").read_text()[-3000:])
                time.sleep(0.5)
            started = time.monotonic()
            report = replay(settings, log_path, None, progress=False)
            while time.monotonic() - started < 1800:  # every topic it reads, all committed
                behind = 0
                for spec in (*INPUT_TOPICS, ENCODE_REQUESTS, USER_UPDATES):
                    done, end = group_progress(settings.kafka, "recstream", spec.name)
                    behind += max(0, end - done)
                if behind == 0:
                    break
                time.sleep(1.0)
            seconds = time.monotonic() - started
            status, text = _get(url + "/metrics")
        finally:
            stop_process(worker)
        lists = sum(1 for _ in read_topic(settings, RECOMMENDATIONS, timeout_s=2.0))
    return text, status, seconds, report.sent, lists


def summarise(samples: Scrape) -> dict[str, Any]:
    """The figures a dashboard would show, from one scrape."""
    inputs = {spec.name for spec in INPUT_TOPICS}
    return {
        "inputs_taken_by_validate_input": sum(
            total(samples, EVENTS, agent="validate-input", topic=t) for t in inputs
        ),
        "events_by_agent": {
            dict(lab)["agent"] + " <- " + dict(lab)["topic"]: v
            for (n, lab), v in samples.items()
            if n == EVENTS
        },
        "recommendations": total(samples, LISTS),
        "dead_letters": total(samples, DEAD_LETTERS),
        "latency_count": total(samples, f"{LATENCY}_count"),
        "latency_p50_le_s": quantile(samples, LATENCY, 0.5),
        "latency_p99_le_s": quantile(samples, LATENCY, 0.99),
        "encoder_texts": total(samples, "recstream_encoder_texts_total"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path, help="a Parquet event log (file or directory)")
    parser.add_argument("--limit", type=int, default=None, help="replay the first N events only")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--text", type=Path, default=None, help="write the raw scrape here")
    args = parser.parse_args(argv)
    if not args.log.exists():
        print(f"error: no event log at {args.log}", file=sys.stderr)
        return 2
    configure_logging("warning")
    with tempfile.TemporaryDirectory(prefix="recstream-scrape-") as tmp:
        text, status, seconds, sent, lists = run(args.log, args.limit, Path(tmp))
    result: dict[str, Any] = {
        "machine": f"{platform.machine()} {platform.node()} ({platform.python_version()})",
        "log": str(args.log),
        "scrape_status": status,
        "seconds": round(seconds, 1),
        "scrape": summarise(parse(text)),
        "same_run": {"events_replayed": sent, "lists_on_topic": lists},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    if args.text:
        args.text.parent.mkdir(parents=True, exist_ok=True)
        args.text.write_text(text)
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
