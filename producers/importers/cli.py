"""``recstream data import``: a public dataset -> a Parquet event log, with a one-line summary."""

from __future__ import annotations

import argparse

from producers.importers import ImportReport, import_dataset


def summary(report: ImportReport) -> str:
    """The one line the command prints about what it wrote."""
    return (
        f"imported {report.events:,} events ({report.users:,} users, {report.items:,} items, "
        f"{report.interactions:,} interactions, {report.reviews:,} reviews) "
        f"in {report.seconds:.1f} s -> {report.out}"
    )


def cli_import(args: argparse.Namespace) -> int:
    """Run the import the arguments describe and print its summary; 0 on success."""
    report = import_dataset(args.format, args.src, args.out, args.item_text)
    print(summary(report))
    return 0
