"""Faust's own ceiling: a worker whose one agent only counts, on a topic already full of events.

Run by ``benchmarks/e2e.py`` as a child process against the same broker, with the same Faust app
class and client settings as recstream's workers:

    python benchmarks/faust_noop.py --bootstrap HOST:PORT --topic T --expect N --out RESULT.json

The rate counts from the first batch the agent receives, so the worker's start and the group's
first rebalance are not in it. The result file holds ``events`` and ``seconds``; the parent stops
this process by its pid once the file is there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--expect", type=int, required=True)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    import faust

    from infra.kafka import faust_broker_options
    from infra.settings import load_settings
    from streams.transport import TunedApp

    settings = load_settings(kafka={"bootstrap_servers": args.bootstrap})
    app = TunedApp(
        f"bench-noop-{os.getpid()}",
        fetch_max_wait_ms=settings.kafka.fetch_max_wait_ms,
        direct_hand_over=False,  # Faust's own hand-over per message: its ceiling
        **faust_broker_options(settings.kafka),
        store="memory://",
        autodiscover=False,
        topic_partitions=args.partitions,
        key_serializer="raw",
        value_serializer="raw",
        consumer_auto_offset_reset="earliest",
        stream_wait_empty=False,
        stream_buffer_maxsize=settings.stream.buffer_maxsize,
        web_enabled=False,
        datadir=tempfile.mkdtemp(prefix="bench-noop-"),
    )
    topic = app.topic(args.topic, value_serializer="raw", key_serializer="raw")

    async def count(stream: Any) -> None:
        seen = first_batch = 0
        first = 0.0
        async for batch in stream.take(settings.stream.batch_size, within=0.02):
            now = time.monotonic()
            if not seen:
                first, first_batch = now, len(batch)
            seen += len(batch)
            if seen >= args.expect:
                result = {"events": seen - first_batch, "seconds": now - first}
                args.out.write_text(json.dumps(result))

    app.agent(topic, name="count")(count)
    worker = faust.Worker(app, loglevel="WARNING", quiet=True)
    worker.execute_from_commandline()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
