"""The ``recstream`` command in a subprocess: exit codes, and one-line errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from clirun import MODULE, SCRIPT, run_cli

from schemas.events import ALL_TYPES


def _run(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, entry: list[str] = MODULE
) -> subprocess.CompletedProcess[str]:
    """Run the CLI with a clean RECSTREAM_* environment (plus ``env``) in ``cwd``."""
    return run_cli(args, cwd=cwd, env=env, entry=entry)


def _one_error_line(result: subprocess.CompletedProcess[str], prefix: str) -> str:
    """The single stderr line, after checking there is exactly one and no traceback."""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(prefix), lines[0]
    return lines[0]


def test_schemas_export_writes_every_schema_and_exits_zero(tmp_path: Path) -> None:
    """`schemas export DIR` writes each record's schema and topics.json, printing their paths."""
    out = tmp_path / "contracts"
    result = _run(["schemas", "export", str(out)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    records = {r.__name__ for r in ALL_TYPES.values()}
    expected = {f"{r}.schema.json" for r in records} | {"topics.json"}
    assert {p.name for p in out.iterdir()} == expected
    assert {Path(line).name for line in result.stdout.splitlines()} == expected
    schema = json.loads((out / "ItemEvent.schema.json").read_text())
    assert schema["title"] == "ItemEvent"


def test_publish_of_a_missing_file_is_one_error_line(tmp_path: Path) -> None:
    """`publish /nonexistent.jsonl` exits non-zero with one "recstream: error:" line."""
    result = _run(["publish", "/nonexistent.jsonl"], cwd=tmp_path)
    assert result.returncode != 0
    line = _one_error_line(result, "recstream: error:")
    assert "/nonexistent.jsonl" in line


@pytest.mark.parametrize(
    "args", [["--bogus"], ["schemas", "export", "out", "--bogus"], ["tail", "--bogus"]]
)
def test_unknown_flag_exits_2_with_one_line(tmp_path: Path, args: list[str]) -> None:
    """An unknown flag is a usage error: exit 2 and one line pointing at --help."""
    result = _run(args, cwd=tmp_path)
    assert result.returncode == 2
    line = _one_error_line(result, "recstream")
    assert ": error: " in line
    assert "--help" in line
    assert not (tmp_path / "out").exists()


def test_unknown_command_exits_2_with_one_line(tmp_path: Path) -> None:
    """A command that does not exist is a usage error on one line naming it."""
    result = _run(["frobnicate"], cwd=tmp_path)
    assert result.returncode == 2
    assert "frobnicate" in _one_error_line(result, "recstream: error:")


@pytest.mark.parametrize(
    ("value", "why"), [("-1", "positive"), ("0", "positive"), ("soon", "number")]
)
def test_tail_rejects_a_non_positive_timeout(tmp_path: Path, value: str, why: str) -> None:
    """`tail --timeout -1` (or 0, or text) is rejected at parse time with exit 2 and one line."""
    result = _run(["tail", "--timeout", value], cwd=tmp_path)
    assert result.returncode == 2
    line = _one_error_line(result, "recstream tail: error:")
    assert "--timeout" in line
    assert why in line


def test_invalid_setting_is_one_line_naming_the_setting(tmp_path: Path) -> None:
    """RECSTREAM_KAFKA__PARTITIONS=abc fails with one line naming kafka.partitions, no traceback."""
    result = _run(
        ["tail", "--timeout", "1", "--max", "1"],
        cwd=tmp_path,
        env={"RECSTREAM_KAFKA__PARTITIONS": "abc"},
    )
    assert result.returncode == 1
    line = _one_error_line(result, "recstream: error:")
    assert "kafka.partitions" in line


def test_invalid_setting_stops_the_worker_before_it_starts(tmp_path: Path) -> None:
    """`worker` with an out-of-range setting exits 1 with one line before touching anything."""
    result = _run(["worker"], cwd=tmp_path, env={"RECSTREAM_KAFKA__PARTITIONS": "0"})
    assert result.returncode == 1
    assert "kafka.partitions" in _one_error_line(result, "recstream: error:")
    assert list(tmp_path.iterdir()) == []


def test_missing_env_file_is_one_line(tmp_path: Path) -> None:
    """--env-file naming a missing file is one line naming that file."""
    result = _run(["--env-file", "nope.env", "tail", "--timeout", "1"], cwd=tmp_path)
    assert result.returncode == 1
    assert "nope.env" in _one_error_line(result, "recstream: error:")


def test_user_error_is_one_line_through_the_console_script(tmp_path: Path) -> None:
    """A UserError from a command module (unknown archive topic) is one line via main()."""
    result = _run(["archive", "--out", "arch", "--topics", "nope.v1"], cwd=tmp_path, entry=SCRIPT)
    assert result.returncode == 1
    assert "nope.v1" in _one_error_line(result, "recstream: error:")


def test_user_error_is_one_line_through_python_dash_m(tmp_path: Path) -> None:
    """A UserError from a command module is one line under `python -m infra.cli` too."""
    result = _run(["archive", "--out", "arch", "--topics", "nope.v1"], cwd=tmp_path)
    assert result.returncode == 1
    assert "nope.v1" in _one_error_line(result, "recstream: error:")


def test_stack_commands_run_with_one_openblas_thread_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`recstream worker`, `up` and `demo` set OPENBLAS_NUM_THREADS=1 before importing their
    module (numpy reads it once, at load); a value the user set is kept, and a client command
    such as `publish` leaves the variable alone."""
    import os

    from infra.cli import WORKER_ENV, _handler, build_parser

    parser = build_parser()
    for argv in (["worker"], ["up"], ["demo"]):
        run = parser.parse_args(argv).run
        assert WORKER_ENV in [c.cell_contents for c in run.__closure__ or ()], argv
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    _handler("builtins:id", WORKER_ENV)(parser.parse_args(["worker"]))
    assert os.environ["OPENBLAS_NUM_THREADS"] == "1"
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "4")
    _handler("builtins:id", WORKER_ENV)(parser.parse_args(["worker"]))
    assert os.environ["OPENBLAS_NUM_THREADS"] == "4"
    publish = parser.parse_args(["publish", "x.jsonl"]).run
    assert WORKER_ENV not in [c.cell_contents for c in publish.__closure__ or ()]
