"""JSON Schema export of every public event record, for clients in any language."""

from __future__ import annotations

import json
from pathlib import Path

from schemas.events import ALL_TYPES, BehaviorEvent
from schemas.topics import ALL_TOPICS


def export_json_schemas(out_dir: Path) -> list[Path]:
    """Write ``<record>.schema.json`` per event record and ``topics.json``; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    seen: set[type] = set()
    for record in ALL_TYPES.values():
        if record in seen:
            continue
        seen.add(record)
        schema = record.model_json_schema(mode="validation")
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        if record is BehaviorEvent:
            schema["title"] = "BehaviorEvent"
        path = out_dir / f"{record.__name__}.schema.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        written.append(path)
    topics = [
        {
            "name": t.name,
            "key": t.key,
            "cleanup.policy": t.cleanup,
            "internal": t.internal,
            "description": t.description,
        }
        for t in ALL_TOPICS
    ]
    path = out_dir / "topics.json"
    path.write_text(json.dumps(topics, indent=2) + "\n")
    written.append(path)
    return written
