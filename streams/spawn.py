"""Start and stop a worker (``recstream worker``) as a child process, for the demo, tests and
benchmarks. It imports nothing heavy: the child loads Faust, torch and the vector store itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from infra.settings import Settings


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """This process's environment plus the settings a child worker must share with us."""
    return {
        **os.environ,
        "RECSTREAM_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "RECSTREAM_KAFKA__PARTITIONS": str(settings.kafka.partitions),
        "RECSTREAM_DATA_DIR": str(settings.data_dir),
        **extra,
    }


def spawn_worker(
    settings: Settings, log_path: Path, role: str = "all", **extra_env: str
) -> subprocess.Popen[bytes]:
    """Start ``recstream worker --role ROLE`` with its output in ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:  # the child keeps its own handle
        return subprocess.Popen(
            [sys.executable, "-m", "infra.cli", "worker", "--role", role],
            env=worker_env(settings, **extra_env),
            stdout=log,
            stderr=subprocess.STDOUT,
            # Its own session: Ctrl-C reaches only the parent, which stops the worker (SIGTERM,
            # graceful) before the broker it depends on.
            start_new_session=True,
        )


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> int:
    """Stop a child by its pid: SIGTERM (a graceful shutdown), then SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)
    return int(proc.returncode)
