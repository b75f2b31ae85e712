"""The operations page's figures, from the workers' ``GET /metrics`` scrapes.

Every second the console scrapes each worker (:mod:`streams.observe` names the metrics), adds
the workers' counters together and keeps one :class:`Point` per scrape. Rates and latency
percentiles are taken over a sliding window of scrapes, as Prometheus' ``rate`` and
``histogram_quantile`` would: a counter that goes down (a worker restarted) counts from zero.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from infra.metrics import Scrape
from streams.ingest import STEP as INGEST_STEP
from streams.observe import ENCODER_TEXTS, EVENTS, LAG, LATENCY, MODEL_INFO, RECOMMENDATIONS

#: Scrapes kept for the charts: five minutes at one a second.
HISTORY = 300
#: Seconds over which rates and latency percentiles are taken.
WINDOW_S = 10.0
QUANTILES = {"p50": 0.5, "p95": 0.95, "p99": 0.99}


@dataclass(frozen=True, slots=True)
class Totals:
    """What the workers' counters add up to at one scrape."""

    events: float = 0.0  # messages the ingest step took in
    recommendations: float = 0.0
    encoder_texts: float = 0.0
    latency_buckets: tuple[tuple[float, float], ...] = ()  # (le, cumulative count), ascending
    lag: Mapping[str, int] = field(default_factory=dict)  # topic -> messages behind
    models: tuple[tuple[str, str], ...] = ()  # (model, version) pairs served


def totals(scrapes: Iterable[Scrape]) -> Totals:
    """Sum the counters, histogram buckets and lag gauges of every worker's scrape."""
    events = recs = texts = 0.0
    buckets: dict[float, float] = {}
    lag: dict[str, int] = {}
    models: set[tuple[str, str]] = set()
    for scrape in scrapes:
        for (name, labels), value in scrape.items():
            tags = dict(labels)
            if name == EVENTS and tags.get("agent") == INGEST_STEP:
                events += value
            elif name == RECOMMENDATIONS:
                recs += value
            elif name == ENCODER_TEXTS:
                texts += value
            elif name == f"{LATENCY}_bucket":
                bound = float(tags["le"])
                buckets[bound] = buckets.get(bound, 0.0) + value
            elif name == LAG:
                topic = tags.get("topic", "")
                lag[topic] = lag.get(topic, 0) + int(value)
            elif name == MODEL_INFO and value == 1:
                models.add((tags.get("model", ""), tags.get("version", "")))
    return Totals(
        events=events,
        recommendations=recs,
        encoder_texts=texts,
        latency_buckets=tuple(sorted(buckets.items())),
        lag=lag,
        models=tuple(sorted(models)),
    )


def quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """The ``q`` quantile of a histogram given as ascending (upper bound, cumulative count)
    pairs, interpolated linearly inside its bucket (Prometheus' ``histogram_quantile``); the
    highest finite bound when it falls in the ``+Inf`` bucket; None with no observations."""
    pairs = [(le, count) for le, count in buckets]
    if not pairs or pairs[-1][1] <= 0:
        return None
    rank = q * pairs[-1][1]
    lower, below = 0.0, 0.0
    for le, count in pairs:
        if count >= rank:
            if math.isinf(le):
                return lower
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return lower


def _increase(now: float, then: float) -> float:
    """How much a counter grew; a counter that went down was reset and counts from zero."""
    return now - then if now >= then else now


def _bucket_increase(
    now: tuple[tuple[float, float], ...], then: tuple[tuple[float, float], ...]
) -> list[tuple[float, float]]:
    before = dict(then)
    reset = any(count < before.get(le, 0.0) for le, count in now)
    return [(le, count if reset else count - before.get(le, 0.0)) for le, count in now]


@dataclass(frozen=True, slots=True)
class Point:
    """One scrape's figures, as the operations page charts them."""

    ts: int  # ms since the epoch
    events_per_s: float
    recommendations_per_s: float
    encoder_texts_per_s: float
    latency_ms: dict[str, float | None]
    lag: dict[str, int]
    lag_total: int
    events_total: int
    recommendations_total: int
    dead_letters_total: int

    def as_json(self) -> dict[str, Any]:
        return {
            "ts": self.ts,
            "events_per_s": round(self.events_per_s, 3),
            "recommendations_per_s": round(self.recommendations_per_s, 3),
            "encoder_texts_per_s": round(self.encoder_texts_per_s, 3),
            "latency_ms": {
                k: None if v is None else round(v, 3) for k, v in self.latency_ms.items()
            },
            "lag": self.lag,
            "lag_total": self.lag_total,
            "events_total": self.events_total,
            "recommendations_total": self.recommendations_total,
            "dead_letters_total": self.dead_letters_total,
        }


class OpsHistory:
    """Scrape totals over time, turned into rates and percentiles over a sliding window."""

    def __init__(self, window_s: float = WINDOW_S, keep: int = HISTORY) -> None:
        self.window_ms = int(window_s * 1000)
        self._scrapes: deque[tuple[int, Totals]] = deque()
        self.points: deque[Point] = deque(maxlen=keep)
        self.models: tuple[tuple[str, str], ...] = ()

    def add(self, ts_ms: int, now: Totals, dead_letters_total: int) -> Point:
        """Record one scrape taken at ``ts_ms`` and return its point."""
        self._scrapes.append((ts_ms, now))
        # Keep the newest scrape at least a window old as the base of every rate.
        while len(self._scrapes) > 2 and self._scrapes[1][0] <= ts_ms - self.window_ms:
            self._scrapes.popleft()
        base_ts, base = self._scrapes[0]
        seconds = (ts_ms - base_ts) / 1000.0

        def rate(a: float, b: float) -> float:
            return _increase(a, b) / seconds if seconds > 0 else 0.0

        recent = _bucket_increase(now.latency_buckets, base.latency_buckets)
        latency = {}
        for name, q in QUANTILES.items():
            value = quantile(q, recent) if seconds > 0 else None
            latency[name] = None if value is None else value * 1000.0
        point = Point(
            ts=ts_ms,
            events_per_s=rate(now.events, base.events),
            recommendations_per_s=rate(now.recommendations, base.recommendations),
            encoder_texts_per_s=rate(now.encoder_texts, base.encoder_texts),
            latency_ms=latency,
            lag=dict(now.lag),
            lag_total=sum(now.lag.values()),
            events_total=int(now.events),
            recommendations_total=int(now.recommendations),
            dead_letters_total=dead_letters_total,
        )
        self.points.append(point)
        self.models = now.models
        return point
