"""``recstream tail`` and ``recstream archive`` (``--compact``: drop forgotten users' rows)."""

from __future__ import annotations

import argparse

import polars as pl

from consumers.archive import archive
from consumers.compact import compact_archive
from consumers.tail import tail
from infra.cli import UserError, load_cli_settings
from schemas.topics import by_name


def cli_tail(args: argparse.Namespace) -> int:
    settings = load_cli_settings(args)
    tail(settings, args.user, args.max_n, args.timeout, as_json=args.json)
    return 0


def cli_archive(args: argparse.Namespace) -> int:
    settings = load_cli_settings(args)
    if args.compact:
        return cli_compact(args)
    topics = None
    if args.topics:
        try:
            topics = [by_name(name.strip()) for name in args.topics.split(",") if name.strip()]
        except KeyError as exc:
            raise UserError(f"unknown topic {exc.args[0]!r}") from None
    report = archive(settings, args.out, topics, idle_timeout_s=args.idle_timeout)
    print(f"archived {report.rows:,} events to {len(report.files)} file(s) in {args.out}")
    return 0


def cli_compact(args: argparse.Namespace) -> int:
    """``recstream archive --out DIR --compact``: one summary line, or one error line."""
    try:
        report = compact_archive(args.out)
    except OSError as exc:
        raise UserError(str(exc)) from None
    except pl.exceptions.PolarsError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot compact {args.out}: {first}") from None
    print(
        f"compacted {args.out}: {report.forgotten_users:,} forgotten user(s), "
        f"{report.rows_dropped:,} row(s) dropped, {len(report.rewritten)} file(s) rewritten, "
        f"{len(report.removed)} removed, {report.files} read"
    )
    return 0
