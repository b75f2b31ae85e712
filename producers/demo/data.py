"""The demo catalogue and personas shipped with recstream (written for this project)."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any


def catalog() -> list[dict[str, Any]]:
    """The demo items as item events (240 items in 10 categories)."""
    text = resources.files(__package__).joinpath("catalog.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def personas() -> list[dict[str, Any]]:
    """Simulated users: id, name, liked item-id prefixes and a one-line description."""
    text = resources.files(__package__).joinpath("personas.json").read_text(encoding="utf-8")
    return list(json.loads(text))
