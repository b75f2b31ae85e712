"""``recstream tail`` and ``recstream archive``."""

from __future__ import annotations

import argparse

from consumers.archive import archive
from consumers.tail import tail
from infra.cli import UserError, load_cli_settings
from schemas.topics import by_name


def cli_tail(args: argparse.Namespace) -> int:
    settings = load_cli_settings(args)
    tail(settings, args.user, args.max_n, args.timeout, as_json=args.json)
    return 0


def cli_archive(args: argparse.Namespace) -> int:
    settings = load_cli_settings(args)
    topics = None
    if args.topics:
        try:
            topics = [by_name(name.strip()) for name in args.topics.split(",") if name.strip()]
        except KeyError as exc:
            raise UserError(f"unknown topic {exc.args[0]!r}") from None
    report = archive(settings, args.out, topics, idle_timeout_s=args.idle_timeout)
    print(f"archived {report.rows:,} events to {len(report.files)} file(s) in {args.out}")
    return 0
