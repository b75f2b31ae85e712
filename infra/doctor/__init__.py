"""``recstream doctor``: check a deployment and say, for each part, what is wrong and how to fix it.

Each check is a small function returning a :class:`Finding` (check, status, message, fix); network
calls are bounded by ``timeout`` seconds. The doctor reads and never changes anything: it creates
no topic and no collection, and reads an embedded Qdrant Edge store's configuration from disk
instead of opening its shards, so it runs beside a worker that holds the store.

Statuses: OK, WARN (works, but look), FAIL (will not work as configured: exit code 1), SKIP (not
checked because a check it depends on failed) and INFO (context).

The checks live beside this module: ``kafka`` (broker, topics) and ``local`` (settings, versions,
vector store, encoder, ranker, GPU), over the ``Finding`` and ``Status`` of ``findings``; this
module runs them in order and renders the result.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import warnings
from collections.abc import Callable
from pathlib import Path

from infra.doctor.findings import Finding, Status, _short
from infra.doctor.kafka import Cluster, check_broker, check_topics
from infra.doctor.local import (
    WORKER_EXTRA,
    check_collections,
    check_encoder,
    check_gpu,
    check_ranker,
    check_vector_store,
    settings_info,
    versions_info,
)
from infra.settings import Settings

__all__ = [
    "WORKER_EXTRA",
    "Cluster",
    "Finding",
    "Status",
    "check_broker",
    "check_collections",
    "check_encoder",
    "check_gpu",
    "check_ranker",
    "check_topics",
    "check_vector_store",
    "cli_doctor",
    "exit_code",
    "render_json",
    "render_text",
    "run_checks",
    "settings_info",
    "versions_info",
]


# --- running and reporting ---------------------------------------------------------------------


def _guarded(check: str, run: Callable[[], Finding]) -> Finding:
    try:
        return run()
    except Exception as exc:  # noqa: BLE001 - a doctor reports a broken check, it never crashes
        return Finding(
            check,
            Status.FAIL,
            f"the check could not finish: {type(exc).__name__}: {_short(exc)}",
            "correct what the message names; if it names nothing of yours, report it as a bug",
        )


def run_checks(
    settings: Settings, timeout: float = 5.0, *, env_file: Path | None = None
) -> list[Finding]:
    """Every check, in order; network calls are bounded by ``timeout`` seconds each."""
    cluster: Cluster | None = None

    def broker() -> Finding:
        nonlocal cluster
        finding, cluster = check_broker(settings.kafka, timeout)
        return finding

    findings = [
        _guarded("settings", lambda: settings_info(settings, env_file)),
        _guarded("versions", versions_info),
        _guarded("broker", broker),
    ]
    checks: list[tuple[str, Callable[[], Finding]]] = [
        ("topics", lambda: check_topics(settings.kafka, cluster, timeout)),
        ("vector-store", lambda: check_vector_store(settings, timeout)),
        ("encoder", lambda: check_encoder(settings)),
        ("ranker", lambda: check_ranker(settings)),
        ("gpu", lambda: check_gpu(settings.encoder)),
    ]
    return findings + [_guarded(name, run) for name, run in checks]


def exit_code(findings: list[Finding]) -> int:
    """1 if any check failed, else 0."""
    return int(any(f.status is Status.FAIL for f in findings))


def render_text(findings: list[Finding]) -> str:
    """One line per finding, a ``fix:`` line under each that is not fine, and a tally."""
    lines = []
    for f in findings:
        lines.append(f"{f.status.value:<5} {f.check:<13} {f.message}")
        if f.fix and f.status in (Status.WARN, Status.FAIL, Status.SKIP):
            lines.append(f"{'':<5} {'':<13} fix: {f.fix}")
    tally = {s: sum(f.status is s for f in findings) for s in (Status.OK, Status.WARN, Status.FAIL)}
    lines.append(", ".join(f"{n} {s.value}" for s, n in tally.items()))
    return "\n".join(lines)


def render_json(findings: list[Finding]) -> str:
    """The findings as a JSON document: ``{"exit_code": 0|1, "findings": [...]}``."""
    rows = [dataclasses.asdict(f) for f in findings]
    return json.dumps({"exit_code": exit_code(findings), "findings": rows}, indent=2)


def cli_doctor(args: argparse.Namespace) -> int:
    """``recstream doctor [--timeout S] [--json]``."""
    from pydantic import ValidationError

    from infra.cli import _one_line, load_cli_settings

    # qdrant-client checks a server's version in a background thread and warns on stderr when
    # it cannot; the vector-store finding already says so.
    warnings.filterwarnings("ignore", message="Failed to obtain server version")
    try:
        settings = load_cli_settings(args)
    except (ValidationError, FileNotFoundError) as exc:
        findings = [
            Finding(
                "settings",
                Status.FAIL,
                _one_line(exc),
                "correct the RECSTREAM_* variable or --env-file (docs/configuration.md)",
            )
        ]
    else:
        findings = run_checks(settings, args.timeout, env_file=args.env_file)
    print(render_json(findings) if args.json else render_text(findings))
    return exit_code(findings)
