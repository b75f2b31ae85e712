"""The web console: watch recommendations change as events arrive.

A small aiohttp application beside the workers (:mod:`streams.console.app`). It talks to the
system only through its public interfaces: it publishes behaviour events to the behaviour topic,
reads the catalogue, recommendation and dead-letter topics, scrapes the workers' ``/metrics``
and REST read path, and reads ``recstream eval`` result folders. ``recstream demo`` starts one on
loopback; ``recstream console`` runs one against any deployment.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from infra.cli import UserError, load_cli_settings
from infra.settings import Settings


def start_console(
    settings: Settings,
    *,
    host: str | None = None,
    port: int | None = None,
    worker_urls: list[str] | None = None,
    eval_dir: Path | None = None,
) -> Any:
    """A started :class:`streams.console.app.ConsoleServer`; its ``url`` is the address."""
    from streams.console.app import Console, ConsoleServer

    if eval_dir is not None and eval_dir.exists() and not eval_dir.is_dir():
        raise UserError(f"--eval-dir {eval_dir} is a file, not a folder")
    console = Console(settings, worker_urls=worker_urls, eval_dir=eval_dir)
    server = ConsoleServer(
        console,
        settings.console.host if host is None else host,
        settings.console.port if port is None else port,
    )
    server.start()
    return server


def cli_console(args: argparse.Namespace) -> int:
    """``recstream console``: serve the console until Ctrl-C or SIGTERM."""
    from infra.kafka import wait_for_broker

    settings = load_cli_settings(args)
    wait_for_broker(settings.kafka)
    server = start_console(
        settings,
        host=args.host,
        port=args.port,
        worker_urls=args.worker_urls,
        eval_dir=args.eval_dir,
    )
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    print(
        f"recstream console on {server.url} (workers: "
        f"{', '.join(server.console.worker_urls) or 'none'}; eval results in "
        f"{server.console.eval_dir}); Ctrl-C stops it",
        file=sys.stderr,
        flush=True,
    )
    try:
        stopped.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0
