"""The worker's garbage collection: long-lived objects kept out of the cyclic collector's scans.

CPython frees most objects by reference counting; its cyclic collector only looks for reference
cycles, but a full (generation 2) collection walks every container object the process holds,
and holds the GIL (so the event loop and the ranking thread) while it does. A worker of role
``all`` holds about half a million such objects once it has started (its modules, the encoder
and ranking libraries, their classes and functions), nearly all of them for its whole life; at
500 events/s CPython ran a full collection every 10 to 15 s, and each took 200 to 270 ms on the
2-core machine of ``docs/performance.md``, so every event in flight waited that long.

:class:`HeapKeeper` moves what has lived a while into CPython's permanent generation
(``gc.freeze``), which collections do not walk:

- :meth:`HeapKeeper.settle` at start, before the worker takes input: one full collection,
  then everything left is frozen;
- :meth:`HeapKeeper.tick` every ``stream.gc_freeze_s`` seconds: a full collection of what is not
  frozen (what the worker made since the last tick, so a short pause), then that is frozen too;
- every ``stream.gc_full_s`` seconds a tick first unfreezes everything, so the collection walks
  the whole heap once: a frozen object that later became part of a garbage cycle is freed then.
  The recstream code keeps no reference cycles in its state, so that pass finds little; it is
  logged with what it freed and how long it took.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from infra.metrics import REGISTRY, Registry

log = structlog.get_logger(__name__)

PAUSE = "recstream_gc_pause_seconds"
FROZEN = "recstream_gc_frozen_objects"


@dataclass(frozen=True, slots=True)
class Pass:
    """One collection by the keeper."""

    full: bool  # the whole heap was walked (everything unfrozen first)
    collected: int  # unreachable objects found
    frozen: int  # objects in the permanent generation afterwards
    seconds: float


class HeapKeeper:
    """Freezes the worker's long-lived objects and collects the rest on a schedule."""

    def __init__(
        self,
        *,
        freeze_s: float,
        full_s: float,
        registry: Registry = REGISTRY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if freeze_s <= 0:
            raise ValueError(f"freeze_s must be positive, not {freeze_s}")
        self.freeze_s = freeze_s
        self.full_s = full_s  # 0: never walk the whole heap again after settle()
        self.registry = registry
        self.clock = clock
        self._last_full = clock()

    def settle(self) -> Pass:
        """Collect everything once and freeze what is left (at start, before taking input)."""
        return self._collect(full=True)

    def tick(self) -> Pass:
        """Collect what is not frozen and freeze the survivors; every ``full_s`` walk it all."""
        due = self.full_s > 0 and self.clock() - self._last_full >= self.full_s
        done = self._collect(full=due)
        if due:
            log.info(
                "gc_full_pass",
                collected=done.collected,
                frozen=done.frozen,
                ms=round(done.seconds * 1000, 1),
            )
        return done

    def _collect(self, *, full: bool) -> Pass:
        started = time.perf_counter()
        if full:
            gc.unfreeze()
        collected = gc.collect()
        gc.freeze()
        seconds = time.perf_counter() - started
        if full:
            self._last_full = self.clock()
        frozen = gc.get_freeze_count()
        self.registry.histogram(PAUSE, kind="full" if full else "recent").observe(seconds)
        self.registry.gauge(FROZEN).set(frozen)
        return Pass(full=full, collected=collected, frozen=frozen, seconds=seconds)
