"""Named counters, gauges and histograms with labels, in a plain thread-safe registry.

:meth:`Registry.snapshot` returns every counter and gauge as plain data (for tests and logs);
:func:`render` writes the whole registry in Prometheus' text format, which each worker serves
at ``GET /metrics`` (streams/web.py). Names follow Prometheus conventions:
``recstream_<thing>_total`` for counters, ``_seconds`` for durations, label names are identifiers.

``REGISTRY`` is the process's registry (one worker process, one set of figures, as in
prometheus_client); components take a ``registry`` argument so tests can pass a fresh one.
"""

from __future__ import annotations

import bisect
import math
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, cast

Kind = Literal["counter", "gauge", "histogram"]
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


#: Bucket bounds (seconds) for latencies from a millisecond to ten minutes (a replayed backlog
#: waits minutes).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
#: Bucket bounds for batch sizes.
SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Histogram:
    """Observations counted into buckets by upper bound, with their sum and count."""

    def __init__(self, buckets: Sequence[float]) -> None:
        bounds = sorted(float(b) for b in buckets)
        if not bounds or any(math.isnan(b) for b in bounds):
            raise ValueError("a histogram needs at least one bucket bound, none NaN")
        self.bounds: tuple[float, ...] = tuple(b for b in bounds if b != math.inf)
        self._lock = threading.Lock()
        self._counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self._sum = 0.0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.bounds, value)
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    @property
    def value(self) -> float:
        """How many observations (what :meth:`Registry.snapshot` reports for a histogram)."""
        with self._lock:
            return float(sum(self._counts))

    def state(self) -> tuple[list[tuple[float, int]], float, int]:
        """Cumulative counts per upper bound (ending with +Inf), the sum and the count."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, running = [], 0
        for bound, n in zip((*self.bounds, math.inf), counts, strict=True):
            running += n
            cumulative.append((bound, running))
        return cumulative, total, running


class Registry:
    """Metrics by name and labels; the same name and labels always give the same metric."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kinds: dict[str, Kind] = {}
        self._metrics: dict[tuple[str, Labels], _Metric | Histogram] = {}
        self._collectors: list[Callable[[], None]] = []

    def counter(self, name: str, **labels: str) -> Counter:
        return cast(Counter, self._get(name, "counter", labels))

    def gauge(self, name: str, **labels: str) -> Gauge:
        return cast(Gauge, self._get(name, "gauge", labels))

    def histogram(
        self, name: str, buckets: Sequence[float] = LATENCY_BUCKETS, **labels: str
    ) -> Histogram:
        """The histogram ``name`` with ``labels``; ``buckets`` is used when it is first made."""
        return cast(Histogram, self._get(name, "histogram", labels, buckets))

    def add_collector(self, collect: Callable[[], None]) -> None:
        """Call ``collect`` before each :func:`render`: for gauges read on demand (lag, say)."""
        with self._lock:
            self._collectors.append(collect)

    def collect(self) -> None:
        with self._lock:
            collectors = list(self._collectors)
        for collect in collectors:
            collect()

    def histograms(self) -> list[tuple[str, Labels, Histogram]]:
        with self._lock:
            return [
                (name, labels, metric)
                for (name, labels), metric in sorted(self._metrics.items())
                if isinstance(metric, Histogram)
            ]

    def kind(self, name: str) -> Kind | None:
        with self._lock:
            return self._kinds.get(name)

    def value(self, name: str, **labels: str) -> float:
        """The current value of ``name`` with exactly ``labels``; 0 if it was never touched."""
        with self._lock:
            metric = self._metrics.get((name, _labels(labels)))
        return metric.value if metric is not None else 0.0

    def snapshot(self) -> list[Sample]:
        """Every metric's current value, sorted by name and labels (a histogram's is its count)."""
        with self._lock:
            items = sorted(self._metrics.items())
            kinds = dict(self._kinds)
        return [Sample(name, kinds[name], labels, metric.value) for (name, labels), metric in items]

    def _get(
        self,
        name: str,
        kind: Kind,
        labels: dict[str, str],
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> _Metric | Histogram:
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
                made: _Metric | Histogram
                if kind == "histogram":
                    made = Histogram(buckets)
                else:
                    made = Counter() if kind == "counter" else Gauge()
                metric = self._metrics[key] = made
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


def histogram(name: str, buckets: Sequence[float] = LATENCY_BUCKETS, **labels: str) -> Histogram:
    """The histogram ``name`` with ``labels`` in the process's registry."""
    return REGISTRY.histogram(name, buckets, **labels)


def snapshot() -> list[Sample]:
    """Every sample in the process's registry."""
    return REGISTRY.snapshot()


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_labels(labels: Labels, extra: tuple[tuple[str, str], ...] = ()) -> str:
    pairs = (*labels, *extra)
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


Scrape = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Scrape:
    """Prometheus text format (as :func:`render` writes it) back to ``{(name, labels): value}``;
    a histogram's lines come back as ``name_bucket`` (with ``le``), ``name_sum``, ``name_count``."""
    out: Scrape = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, value = line.rsplit(" ", 1)
        name, _, rest = head.partition("{")
        labels = []
        for part in rest.removesuffix("}").split('",') if rest else []:
            key, _, quoted = part.partition('="')
            labels.append((key, quoted.removesuffix('"')))
        out[(name, frozenset(labels))] = float(value.replace("+Inf", "inf"))
    return out


def render(registry: Registry = REGISTRY) -> str:
    """The registry in Prometheus' text exposition format (version 0.0.4)."""
    registry.collect()
    lines: list[str] = []
    typed: set[str] = set()
    for sample in registry.snapshot():
        if sample.kind == "histogram":
            continue
        if sample.name not in typed:
            typed.add(sample.name)
            lines.append(f"# TYPE {sample.name} {sample.kind}")
        lines.append(f"{sample.name}{_format_labels(sample.labels)} {_number(sample.value)}")
    for name, labels, hist in registry.histograms():
        if name not in typed:
            typed.add(name)
            lines.append(f"# TYPE {name} histogram")
        buckets, total, count = hist.state()
        for bound, n in buckets:
            lines.append(f"{name}_bucket{_format_labels(labels, (('le', _number(bound)),))} {n}")
        lines.append(f"{name}_sum{_format_labels(labels)} {_number(total)}")
        lines.append(f"{name}_count{_format_labels(labels)} {count}")
    return "\n".join(lines) + "\n"
