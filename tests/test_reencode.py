"""recstream reencode: the log's catalogue and reviews brought up to the current encoder through
the stream's encode step, over Qdrant Edge with the real MiniLM weights: forgotten users' reviews
and removed items left out, current vectors skipped, an interrupted run resumed."""

from __future__ import annotations

from pathlib import Path

import pytest
from clirun import run_cli

from infra.settings import Settings, load_settings
from schemas.eventlog import rows_to_frame, to_row
from schemas.events import Event, ForgetUserEvent, ItemEvent, ItemRemovedEvent, ReviewEvent
from streams import reencode as job
from streams.services import Services

T0 = 1_700_000_000_000


def _log(path: Path) -> Path:
    events: list[Event] = [
        ItemEvent(
            type="item",
            event_id="i1",
            ts=T0,
            item_id="kettle",
            title="Kettle",
            description="A steel kettle that boils a litre in two minutes.",
        ),
        ItemEvent(
            type="item",
            event_id="i2",
            ts=T0 + 1,
            item_id="novel",
            title="Novel",
            description="A space opera about a generation ship.",
        ),
        ItemEvent(
            type="item",
            event_id="i3",
            ts=T0 + 2,
            item_id="gone",
            title="Gone",
            description="An item that leaves the catalogue.",
        ),
        ReviewEvent(
            type="review",
            event_id="r1",
            ts=T0 + 3,
            user_id="ann",
            item_id="kettle",
            text="Boils fast and pours cleanly.",
        ),
        ReviewEvent(
            type="review",
            event_id="r2",
            ts=T0 + 4,
            user_id="bob",
            item_id="novel",
            text="Gripping from the first page.",
        ),
        ItemEvent(
            type="item",
            event_id="i4",
            ts=T0 + 5,
            item_id="kettle",
            title="Kettle 2",
            description="A quieter steel kettle with a blue light.",
        ),
        ItemRemovedEvent(type="item_removed", event_id="x1", ts=T0 + 6, item_id="gone"),
        ForgetUserEvent(type="forget_user", event_id="f1", ts=T0 + 7, user_id="bob"),
    ]
    rows = [to_row(e, topic="archived", partition=0, offset=n) for n, e in enumerate(events)]
    rows_to_frame(rows).write_parquet(path)
    return path


def _settings(tmp_path: Path, precision: str) -> Settings:
    return load_settings(
        data_dir=tmp_path / "data", encoder={"precision": precision, "device": "cpu"}
    )


def test_log_requests_keep_the_latest_item_text_and_drop_removed_and_forgotten(
    tmp_path: Path,
) -> None:
    """From the log: the kettle's second text only, the novel, ann's review; no removed item
    and no review by the forgotten user."""
    from producers.replay import load_sorted_log

    reqs = job.log_requests(load_sorted_log(_log(tmp_path / "log.parquet")))
    assert sorted((r.kind, r.item_id, r.user_id) for r in reqs) == [
        ("item", "kettle", None),
        ("item", "novel", None),
        ("review", "kettle", "ann"),
    ]
    kettle = next(r for r in reqs if r.kind == "item" and r.item_id == "kettle")
    assert "quieter" in kettle.text


def test_reencode_is_resumable_and_skips_what_is_current(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp32 encodes all three texts; a second fp32 run encodes none; a bf16 run (another
    encoder version) stopped after its first batch, then run again, encodes only the rest, and
    the stored vectors end up bf16's."""
    log = _log(tmp_path / "log.parquet")
    first = job.reencode(_settings(tmp_path, "fp32"), log, batch_size=2)
    assert (first.requests, first.encoded, first.unchanged, first.failed) == (3, 3, 0, 0)
    again = job.reencode(_settings(tmp_path, "fp32"), log, batch_size=2)
    assert (again.encoded, again.unchanged) == (0, 3)

    calls = {"n": 0}
    real_run = job.EncodeStep.run

    async def stop_after_one(self, batch, *, announce=True):  # type: ignore[no-untyped-def]
        if calls["n"] == 1:
            raise KeyboardInterrupt
        calls["n"] += 1
        return await real_run(self, batch, announce=announce)

    monkeypatch.setattr(job.EncodeStep, "run", stop_after_one)
    with pytest.raises(KeyboardInterrupt):
        job.reencode(_settings(tmp_path, "bf16"), log, batch_size=2)
    monkeypatch.setattr(job.EncodeStep, "run", real_run)
    resumed = job.reencode(_settings(tmp_path, "bf16"), log, batch_size=2)
    assert (resumed.encoded, resumed.unchanged) == (1, 2)

    settings = _settings(tmp_path, "bf16")
    services = Services(settings)
    try:
        stored = services.store().retrieve("items", ["kettle", "novel", "gone"])
        assert set(stored) == {"kettle", "novel"}
        expected = services.encoder().encode(
            ["Kettle 2. A quieter steel kettle with a blue light."]
        )
        cosine = float(stored["kettle"].vector @ expected[0])
        assert cosine > 0.99
        reviews = services.store().count("reviews")
    finally:
        services.close()
    assert reviews == 1


def test_cli_reencode_reports_counts_and_a_missing_log_in_one_line(tmp_path: Path) -> None:
    """The command prints what it encoded; a log that does not exist is one line, exit 2."""
    log = _log(tmp_path / "log.parquet")
    env = {"RECSTREAM_DATA_DIR": str(tmp_path / "data"), "RECSTREAM_ENCODER__DEVICE": "cpu"}
    done = run_cli(["reencode", str(log), "--batch-size", "8"], env=env)
    assert done.returncode == 0, done.stderr
    assert "3 texts in the log: 3 encoded, 0 already current, 0 failed" in done.stdout
    missing = run_cli(["reencode", str(tmp_path / "nope.parquet")], env=env)
    assert missing.returncode != 0
    assert len(missing.stderr.strip().splitlines()) == 1
    assert "nope.parquet" in missing.stderr
