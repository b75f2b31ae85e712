"""What a worker counts and times, under the names its ``GET /metrics`` serves.

The figures live in :data:`infra.metrics.REGISTRY`; the agents call the helpers here as they
work, and :func:`watch_consumer` adds the read-on-scrape figures (consumer lag). The Grafana
dashboard in ``infra/deploy/grafana`` charts exactly these names.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from faust.exceptions import ConsumerNotStarted

from infra.metrics import REGISTRY, SIZE_BUCKETS, Registry
from streams.transport import is_input

EVENTS = "recstream_events_total"  # counter {topic, agent}: messages an agent took in
LAG = "recstream_consumer_lag"  # gauge {topic, partition}: messages behind the end
LATENCY = "recstream_event_to_recommendation_seconds"  # histogram: receipt to list sent
DEAD_LETTERS = "recstream_dead_letters_total"  # counter {stage, reason}
ENCODER_BATCH = "recstream_encoder_batch_size"  # histogram: texts per encoder call
ENCODER_TEXTS = "recstream_encoder_texts_total"  # counter: texts encoded
MODEL_INFO = "recstream_model_info"  # gauge {model, version} = 1: what this worker serves
RECOMMENDATIONS = "recstream_recommendations_total"  # counter: lists sent


def count_events(
    agent: str, events: Iterable[Any], registry: Registry = REGISTRY, *, per_line: bool = False
) -> None:
    """Count a batch of Faust events by the topic each came from; ``per_line``: count each line
    of a message as one event (messages that carry several records, one per line)."""
    count_messages(agent, (e.message for e in events), registry, per_line=per_line)


def count_messages(
    agent: str, messages: Iterable[Any], registry: Registry = REGISTRY, *, per_line: bool = False
) -> None:
    """:func:`count_events` for the messages themselves."""
    counts: Counter[str] = Counter()
    for m in messages:
        value = m.value
        counts[m.topic] += 1 + value.count(b"\n") if per_line and value else 1
    for topic, n in counts.items():
        registry.counter(EVENTS, topic=topic, agent=agent).inc(n)


def dead_lettered(stage: str, reason: str, registry: Registry = REGISTRY) -> None:
    registry.counter(DEAD_LETTERS, stage=stage, reason=reason).inc()


def recommended(latency_s: float, registry: Registry = REGISTRY) -> None:
    """A list was sent ``latency_s`` after the event that started it was received."""
    registry.counter(RECOMMENDATIONS).inc()
    registry.histogram(LATENCY).observe(latency_s)


def encoded(texts: int, registry: Registry = REGISTRY) -> None:
    """One encoder call over ``texts`` texts."""
    registry.histogram(ENCODER_BATCH, SIZE_BUCKETS).observe(texts)
    registry.counter(ENCODER_TEXTS).inc(texts)


def serving(model: str, version: str, registry: Registry = REGISTRY) -> None:
    """Mark ``model``/``version`` as what this worker serves: its gauge at 1, any other at 0."""
    for sample in registry.snapshot():
        if sample.name == MODEL_INFO:
            registry.gauge(MODEL_INFO, **dict(sample.labels)).set(0)
    registry.gauge(MODEL_INFO, model=model, version=version).set(1)


def watch_consumer(app: Any, registry: Registry = REGISTRY) -> None:
    """Before each scrape, set the consumer lag of every stream partition ``app`` has assigned:
    the partition's end (high watermark) less the next offset the worker will read. Table
    changelogs and Faust's own assignor topic are left out: they are read at recovery only."""

    def collect() -> None:
        consumer = getattr(app, "_consumer", None)  # None until the worker has started
        if consumer is None:
            return
        try:
            assigned = consumer.assignment()
        except ConsumerNotStarted:  # nothing assigned yet: nothing to report
            return
        for tp in assigned:
            if not is_input(tp):
                continue
            end = consumer.highwater(tp)
            if end is None:
                continue
            read = consumer._read_offset.get(tp)
            position = 0 if read is None else read + 1
            lag = max(0, int(end) - position)
            registry.gauge(LAG, topic=tp.topic, partition=str(tp.partition)).set(lag)

    registry.add_collector(collect)
