"""What every doctor check returns: a :class:`Finding` with its :class:`Status`."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Status(StrEnum):
    """How a check came out; only FAIL makes the exit code 1."""

    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"
    SKIP = "SKIP"
    INFO = "INFO"


_SEVERITY = {Status.INFO: 0, Status.OK: 0, Status.SKIP: 1, Status.WARN: 1, Status.FAIL: 2}


@dataclass(frozen=True, slots=True)
class Finding:
    """The outcome of one check: what was found and, unless all is well, how to fix it."""

    check: str
    status: Status
    message: str
    fix: str = ""


def _short(exc: BaseException, limit: int = 240) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
