"""``recstream up`` (embedded broker + topics + worker) and ``recstream worker``."""

from __future__ import annotations

import argparse
import sys

from infra.broker import EmbeddedBroker
from infra.cli import load_cli_settings
from streams.worker import run_worker


def cli_worker(args: argparse.Namespace) -> int:
    settings = load_cli_settings(args)
    return run_worker(settings, args.role)


def cli_up(args: argparse.Namespace) -> int:
    """Start the embedded broker, provision topics and run the worker (role all) until Ctrl-C."""
    probe = load_cli_settings(args)
    log_file = probe.data_dir / "broker.log"
    probe.data_dir.mkdir(parents=True, exist_ok=True)
    with EmbeddedBroker(port=args.port, log_file=log_file) as broker:
        settings = load_cli_settings(args, bootstrap_servers=broker.bootstrap_servers)
        print(
            f"recstream: broker on {broker.bootstrap_servers} (pid {broker.pid}); "
            f"data in {settings.data_dir}; Ctrl-C stops all",
            file=sys.stderr,
        )
        return run_worker(settings, "all")
