"""``recstream reencode LOG``: bring every stored vector up to the current encoder.

After a model change (another model directory, or another precision: both change the encoder's
version) every item and review vector must be encoded again. The job rebuilds, from the event
log, the encode requests the stream made (the latest text per item, every review, minus reviews of
users who were forgotten and items removed) and runs them through the stream's own encode step,
in batches, with a progress line. Each stored point carries the hash of its text and the encoder
version, so what is already current is skipped: the job is resumable (stop it, run it again, it
goes on where it stopped) and a second run with the same model encodes nothing.

It opens the vector store itself: with the embedded Qdrant Edge, stop the encoder worker first
(the store belongs to one process); a Qdrant server can be re-encoded while workers run.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from infra.cli import load_cli_settings
from infra.settings import Settings
from models.evaluation.protocols import Progress
from producers.replay import ReplayReport, input_events, load_sorted_log
from schemas.events import ForgetUserEvent
from schemas.internal import EncodeRequest
from schemas.topics import DEAD_LETTER, ENCODE_REQUESTS
from streams.encode import EncodeStep, coalesce
from streams.ingest import route
from streams.services import Services
from streams.sinks import Output, Sinks

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class LogRow:
    """Where a request came from, in the shape the dead-letter record reads from a message."""

    topic: str
    partition: int
    offset: int
    value: bytes


class _Rejects(Sinks):
    """Dead letters kept in memory (the job has no broker); other sends are dropped."""

    def __init__(self) -> None:
        super().__init__({})
        self.letters: list[bytes] = []

    def send(self, out: Output) -> None:
        if out.spec is DEAD_LETTER:
            self.letters.append(out.value)


@dataclass
class ReencodeReport:
    requests: int = 0
    encoded: int = 0
    unchanged: int = 0
    failed: int = 0
    seconds: float = 0.0
    encoder: str = ""
    rejects: list[bytes] = field(default_factory=list)


def log_requests(frame: Any, *, scrub: bool = True) -> list[EncodeRequest]:
    """The encode requests the stream made for the log's events, coalesced: the latest request
    per item (none for a removed item), and every review whose author was not forgotten later.
    ``scrub`` is the stream's ``privacy.scrub_pii``, so review texts hash as the stream's did."""
    reqs: list[EncodeRequest] = []
    for event in input_events(frame, ReplayReport()):
        if isinstance(event, ForgetUserEvent):
            reqs = [r for r in reqs if not (r.kind == "review" and r.user_id == event.user_id)]
            continue
        for out in route(event, event.ts, scrub=scrub):
            if out.spec is ENCODE_REQUESTS:
                reqs.append(EncodeRequest.model_validate_json(out.value))
    return [r for r in coalesce(reqs) if r.kind != "item_removed"]


def reencode(
    settings: Settings, log_path: Path, *, batch_size: int, services: Services | None = None
) -> ReencodeReport:
    """Encode what is not current; returns the counts. Services it opens itself it closes."""
    started = time.monotonic()
    reqs = log_requests(load_sorted_log(log_path), scrub=settings.privacy.scrub_pii)
    owned = services is None
    services = services or Services(settings)
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="reencode") as executor:
            sinks = _Rejects()
            step = EncodeStep.for_services(services, sinks, executor)
            report = ReencodeReport(requests=len(reqs), encoder=step.encoder.version)
            asyncio.run(_in_batches(step, reqs, log_path, batch_size, report))
            report.rejects = sinks.letters
    finally:
        if owned:
            services.close()
    report.seconds = round(time.monotonic() - started, 1)
    log.info(
        "reencoded",
        requests=report.requests,
        encoded=report.encoded,
        unchanged=report.unchanged,
        failed=report.failed,
        seconds=report.seconds,
    )
    return report


async def _in_batches(
    step: EncodeStep,
    reqs: list[EncodeRequest],
    log_path: Path,
    batch_size: int,
    report: ReencodeReport,
) -> None:
    """The requests through ``step`` in batches, counted into ``report``, with a progress line."""
    progress = Progress(f"re-encoding for {report.encoder}", len(reqs))
    for start in range(0, len(reqs), batch_size):
        chunk = reqs[start : start + batch_size]
        rows = [
            (r, LogRow(str(log_path), 0, start + n, r.model_dump_json().encode()))
            for n, r in enumerate(chunk)
        ]
        counts = await step.run(rows, announce=False)
        report.encoded += counts["encoded"]
        report.unchanged += counts["unchanged"]
        report.failed += counts["failed"]
        progress.update(start + len(chunk))
    progress.update(len(reqs), final=True)


def cli_reencode(args: argparse.Namespace) -> int:
    settings = load_cli_settings(args)
    report = reencode(settings, args.log, batch_size=args.batch_size)
    print(
        f"{report.requests:,} texts in the log: {report.encoded:,} encoded, "
        f"{report.unchanged:,} already current, {report.failed:,} failed "
        f"({report.encoder}, {report.seconds:.0f} s)"
    )
    for letter in report.rejects:
        print(letter.decode(errors="replace"), file=sys.stderr)
    return 1 if report.failed else 0
