"""tail: print recommendations from the recommendation topic, as readable blocks or JSON lines."""

from __future__ import annotations

import sys
from typing import TextIO

from consumers.consumer import RecommendationConsumer
from infra.settings import Settings
from schemas.events import RecommendationEvent
from schemas.serde import encode


def format_recommendation(event: RecommendationEvent) -> str:
    """A recommendation as a readable block: who, what triggered it, latency, ranked items."""
    lines = [
        f"user {event.user_id}  trigger {event.trigger_event_id}  "
        f"latency {event.latency_ms:.1f} ms  model {event.model_version}"
    ]
    width = max((len(item.item_id) for item in event.items), default=0)
    for item in sorted(event.items, key=lambda i: i.rank):
        reasons = "; ".join(item.reasons)
        lines.append(f"  {item.rank}. {item.item_id:<{width}}  {item.score:.3f}  — {reasons}")
    if not event.items:
        lines.append("  (no items)")
    return "\n".join(lines)


def tail(
    settings: Settings,
    user: str | None = None,
    max_n: int | None = None,
    timeout_s: float | None = None,
    *,
    as_json: bool = False,
    out: TextIO | None = None,
    from_beginning: bool = True,
) -> int:
    """Print recommendations until ``max_n`` are shown or none arrives for ``timeout_s``.

    Returns how many were printed. ``as_json`` prints each as one JSON line (the topic's own
    format); otherwise each is a readable block followed by a blank line. ``out`` defaults to
    standard output.
    """
    out = out if out is not None else sys.stdout
    printed = 0
    with RecommendationConsumer(settings, user_id=user, from_beginning=from_beginning) as consumer:
        while max_n is None or printed < max_n:
            event = consumer.poll(timeout_s if timeout_s is not None else 1.0)
            if event is None:
                if timeout_s is not None:
                    break
                continue
            if as_json:
                out.write(encode(event).decode("utf-8") + "\n")
            else:
                out.write(format_recommendation(event) + "\n\n")
            out.flush()
            printed += 1
    return printed
