"""archive: consume topics into a rolling Parquet event log (the embedded mode's durable history).

Consumes with the ``recstream-archive`` group and commits offsets only after the rows read so far
are safely in a file, so a restart continues where the last written file ended (at-least-once: a
crash between writing and committing can repeat rows, never lose them). Files are written
atomically: a hidden temporary file, then a rename. With ``privacy.scrub_pii`` (the default) a
review's text is scrubbed of e-mail addresses, phone and card numbers before its row is written.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from consumers.consumer import usable
from infra.kafka import consumer_config
from infra.settings import Settings
from schemas.eventlog import rows_to_frame, to_row, write_atomically
from schemas.events import ALL_TYPES, INPUT_TYPES, Event, ReviewEvent
from schemas.privacy import scrub_pii
from schemas.serde import InvalidEvent, parse_object, validate_object
from schemas.topics import INPUT_TOPICS, TopicSpec

log = structlog.get_logger(__name__)

ARCHIVE_GROUP = "recstream-archive"
#: Topics archived when none are named: everything the backend publishes.
DEFAULT_TOPICS: tuple[TopicSpec, ...] = INPUT_TOPICS
_FILE_RE = re.compile(r"^events-(-?\d+)-(\d+)\.parquet$")


@dataclass
class ArchiveReport:
    """What one archive run wrote."""

    rows: int = 0
    files: list[Path] = field(default_factory=list)
    by_topic: dict[str, int] = field(default_factory=dict)
    skipped: int = 0  # undecodable messages (already on the dead-letter topic via the worker)


def decode_message(msg: Message) -> Event:
    """A consumed message as its event record, or :class:`InvalidEvent`.

    Input events missing ``event_id`` or ``ts`` get stable ones from the message: its coordinates
    and its broker timestamp, so archiving the same message twice gives the same row.
    """
    topic, raw = msg.topic() or "", msg.value()
    if raw is None:
        raise InvalidEvent("empty", "message has no value")
    obj = parse_object(raw)
    event_type = obj.get("type")
    record = ALL_TYPES.get(event_type) if isinstance(event_type, str) else None
    if record is None or event_type in INPUT_TYPES:
        defaults: dict[str, Any] = {"event_id": f"{topic}-{msg.partition()}-{msg.offset()}"}
        kind, stamp = msg.timestamp()
        if kind and stamp > 0:
            defaults["ts"] = stamp
        filled = {k: v for k, v in defaults.items() if obj.get(k) is None}
        return validate_object({**filled, **obj}, topic)
    try:
        return record.model_validate(obj)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise InvalidEvent("invalid_field", f"{event_type}: {str(exc)[:500]}") from None


def archive_row(
    event: Event, topic: str, partition: int, offset: int, *, scrub: bool = True
) -> dict[str, Any]:
    """The event-log row archived for ``event``; a review's text scrubbed when ``scrub``."""
    row = to_row(event, topic, partition, offset)
    if scrub and isinstance(event, ReviewEvent):
        row["text"] = scrub_pii(event.text)
    return row


def next_sequence(out_dir: Path) -> int:
    """One more than the highest file sequence number already in ``out_dir`` (0 if none)."""
    seqs = [int(m.group(2)) for p in out_dir.iterdir() if (m := _FILE_RE.match(p.name))]
    return max(seqs, default=-1) + 1


class _Batch:
    """Rows read since the last file, and the offsets to commit once they are written."""

    def __init__(self, out_dir: Path, seq: int, *, scrub: bool = True) -> None:
        self.out_dir = out_dir
        self.scrub = scrub
        self.seq = seq
        self.rows: list[dict[str, Any]] = []
        self.offsets: dict[tuple[str, int], int] = {}
        self.started = time.monotonic()

    def add(self, msg: Message, report: ArchiveReport) -> None:
        topic, partition, offset = msg.topic() or "", msg.partition() or 0, msg.offset() or 0
        if not self.rows and not self.offsets:
            self.started = time.monotonic()
        self.offsets[(topic, partition)] = offset + 1
        try:
            event = decode_message(msg)
        except InvalidEvent as exc:
            report.skipped += 1
            log.warning(
                "decode_failed",
                topic=topic,
                partition=partition,
                offset=offset,
                error=exc.error_type,
            )
            return
        self.rows.append(archive_row(event, topic, partition, offset, scrub=self.scrub))

    def age_s(self) -> float:
        return time.monotonic() - self.started if (self.rows or self.offsets) else 0.0

    def write(self, consumer: Consumer, report: ArchiveReport) -> None:
        """Write the buffered rows to a new file (if any), then commit the offsets read."""
        if self.rows:
            path = self._write_file()
            report.files.append(path)
            report.rows += len(self.rows)
            for row in self.rows:
                report.by_topic[row["topic"]] = report.by_topic.get(row["topic"], 0) + 1
            log.info("archive_file_written", path=str(path), rows=len(self.rows))
        if self.offsets:
            commit = [TopicPartition(t, p, o) for (t, p), o in sorted(self.offsets.items())]
            try:
                consumer.commit(offsets=commit, asynchronous=False)
            except KafkaException as exc:
                log.warning("commit_failed", error=str(exc), partitions=len(commit))
        self.rows, self.offsets = [], {}

    def _write_file(self) -> Path:
        first_ts = min(int(row["ts"]) for row in self.rows)
        path = self.out_dir / f"events-{first_ts}-{self.seq:06d}.parquet"
        write_atomically(rows_to_frame(self.rows), path)
        self.seq += 1
        return path


def archive(
    settings: Settings,
    out_dir: Path,
    topics: list[TopicSpec] | None = None,
    *,
    max_rows_per_file: int = 100_000,
    idle_timeout_s: float | None = None,
    stop: threading.Event | None = None,
    flush_interval_s: float = 60.0,
    group_id: str = ARCHIVE_GROUP,
) -> ArchiveReport:
    """Archive ``topics`` (default: behaviour, catalogue, forget) to rolling Parquet files.

    A file is written when ``max_rows_per_file`` rows are buffered, when the oldest buffered row
    is ``flush_interval_s`` old, before partitions are revoked, and at the end. The run ends when
    ``stop`` is set or, if ``idle_timeout_s`` is given, when nothing arrived for that long.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = list(topics) if topics else list(DEFAULT_TOPICS)
    consumer = Consumer(consumer_config(settings.kafka, group_id, **{"enable.auto.commit": False}))
    report = ArchiveReport()
    batch = _Batch(out_dir, next_sequence(out_dir), scrub=settings.privacy.scrub_pii)
    assigned = threading.Event()

    def on_assign(_: Consumer, partitions: list[TopicPartition]) -> None:
        assigned.set()

    def on_revoke(_: Consumer, partitions: list[TopicPartition]) -> None:
        batch.write(consumer, report)

    consumer.subscribe([s.name for s in specs], on_assign=on_assign, on_revoke=on_revoke)
    log.info("archive_started", topics=[s.name for s in specs], out=str(out_dir), group=group_id)
    try:
        _consume(
            consumer,
            batch,
            report,
            max_rows=max_rows_per_file,
            idle_timeout_s=idle_timeout_s,
            stop=stop,
            flush_interval_s=flush_interval_s,
            assigned=assigned,
        )
    finally:
        batch.write(consumer, report)
        consumer.close()
    log.info("archive_done", rows=report.rows, files=len(report.files), skipped=report.skipped)
    return report


def _consume(
    consumer: Consumer,
    batch: _Batch,
    report: ArchiveReport,
    *,
    max_rows: int,
    idle_timeout_s: float | None,
    stop: threading.Event | None,
    flush_interval_s: float,
    assigned: threading.Event,
) -> None:
    """The poll loop: buffer messages, write files as they fill or age, end when idle or stopped."""
    last = time.monotonic()
    while stop is None or not stop.is_set():
        msg = usable(consumer.poll(0.5))
        now = time.monotonic()
        if msg is None:
            if not assigned.is_set():
                last = now  # the idle clock starts once the group has given us partitions
            elif idle_timeout_s is not None and now - last >= idle_timeout_s:
                return
        else:
            last = now
            batch.add(msg, report)
        if len(batch.rows) >= max_rows or batch.age_s() >= flush_interval_s:
            batch.write(consumer, report)
