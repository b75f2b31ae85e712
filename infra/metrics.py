"""Named counters and gauges with labels, in a plain thread-safe registry.

Nothing here serves them yet: :meth:`Registry.snapshot` returns every sample as plain data, which
a Prometheus endpoint (or a test) can read. Names follow Prometheus conventions:
``recstream_<thing>_total`` for counters, label names are identifiers.

``REGISTRY`` is the process's registry (one worker process, one set of figures, as in
prometheus_client); components take a ``registry`` argument so tests can pass a fresh one.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Literal, cast

Kind = Literal["counter", "gauge"]
Labels = tuple[tuple[str, str], ...]

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


@dataclass(frozen=True, slots=True)
class Sample:
    """One metric's value at the time of a snapshot."""

    name: str
    kind: Kind
    labels: Labels
    value: float


class _Metric:
    """A value behind a lock: ``+=`` on a float is not atomic across threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = 0.0

    @property
    def value(self) -> float:
        with self._lock:
            return self._value


class Counter(_Metric):
    """A count that only goes up."""

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError(f"a counter only goes up; cannot add {amount}")
        with self._lock:
            self._value += amount


class Gauge(_Metric):
    """A value that goes up and down."""

    def set(self, value: float) -> None:
        with self._lock:
            self._value = float(value)

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self._value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.inc(-amount)


class Registry:
    """Metrics by name and labels; the same name and labels always give the same metric."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kinds: dict[str, Kind] = {}
        self._metrics: dict[tuple[str, Labels], _Metric] = {}

    def counter(self, name: str, **labels: str) -> Counter:
        return cast(Counter, self._get(name, "counter", labels))

    def gauge(self, name: str, **labels: str) -> Gauge:
        return cast(Gauge, self._get(name, "gauge", labels))

    def value(self, name: str, **labels: str) -> float:
        """The current value of ``name`` with exactly ``labels``; 0 if it was never touched."""
        with self._lock:
            metric = self._metrics.get((name, _labels(labels)))
        return metric.value if metric is not None else 0.0

    def snapshot(self) -> list[Sample]:
        """Every metric's current value, sorted by name and labels."""
        with self._lock:
            items = sorted(self._metrics.items())
            kinds = dict(self._kinds)
        return [Sample(name, kinds[name], labels, metric.value) for (name, labels), metric in items]

    def _get(self, name: str, kind: Kind, labels: dict[str, str]) -> _Metric:
        if not _NAME.fullmatch(name):
            raise ValueError(f"invalid metric name {name!r}")
        bad = [label for label in labels if not _LABEL.fullmatch(label)]
        if bad:
            raise ValueError(f"invalid label names {bad} for metric {name!r}")
        key = (name, _labels(labels))
        with self._lock:
            known = self._kinds.setdefault(name, kind)
            if known != kind:
                raise ValueError(f"metric {name!r} is a {known}, not a {kind}")
            metric = self._metrics.get(key)
            if metric is None:
                metric = self._metrics[key] = Counter() if kind == "counter" else Gauge()
            return metric


def _labels(labels: dict[str, str]) -> Labels:
    return tuple(sorted((k, str(v)) for k, v in labels.items()))


#: The process's registry.
REGISTRY = Registry()


def counter(name: str, **labels: str) -> Counter:
    """The counter ``name`` with ``labels`` in the process's registry."""
    return REGISTRY.counter(name, **labels)


def gauge(name: str, **labels: str) -> Gauge:
    """The gauge ``name`` with ``labels`` in the process's registry."""
    return REGISTRY.gauge(name, **labels)


def snapshot() -> list[Sample]:
    """Every sample in the process's registry."""
    return REGISTRY.snapshot()
