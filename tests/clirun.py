"""Run the ``recstream`` CLI in a child process, the way a user's shell would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from infra.broker import free_port

#: ``python -m infra.cli``.
MODULE = [sys.executable, "-m", "infra.cli"]
#: The console script's way in: ``infra.cli`` imported as a module, then ``main()``.
SCRIPT = [sys.executable, "-c", "import sys; from infra.cli import main; sys.exit(main())"]


def run_cli(
    args: list[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
    entry: list[str] = MODULE,
) -> subprocess.CompletedProcess[str]:
    """Run the CLI with a clean RECSTREAM_* environment plus ``env``.

    Without a ``RECSTREAM_BOOTSTRAP_SERVERS`` in ``env``, a command that reaches for a broker
    finds a closed port.
    """
    base = {k: v for k, v in os.environ.items() if not k.startswith("RECSTREAM_")}
    base["RECSTREAM_BOOTSTRAP_SERVERS"] = f"127.0.0.1:{free_port()}"
    return subprocess.run(
        [*entry, *args],
        cwd=cwd,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
