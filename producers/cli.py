"""``recstream publish FILE``: events from JSONL, CSV or Parquet to their topics."""

from __future__ import annotations

import argparse
import sys

from infra.cli import load_cli_settings
from producers.publish import publish_file


def cli_publish(args: argparse.Namespace) -> int:
    """Publish the file; exit 1 when any row was rejected or undelivered, else 0."""
    settings = load_cli_settings(args)
    report = publish_file(settings, args.file, args.format, progress=sys.stderr.isatty())
    topics = ", ".join(f"{name}: {n:,}" for name, n in sorted(report.by_topic.items()))
    print(
        f"published {report.sent:,} events in {report.seconds:.1f} s ({topics}); "
        f"rejected {report.rejected:,}; undelivered {report.failed:,}"
    )
    return 1 if report.rejected or report.failed else 0
