"""The worker's garbage collection policy (streams/heap.py), with CPython's real collector."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from infra.metrics import Registry
from streams.heap import FROZEN, PAUSE, HeapKeeper


class _Node:
    """A container that can sit in a reference cycle and be watched through a weak reference."""

    def __init__(self) -> None:
        self.other: _Node | None = None


def _cycle() -> weakref.ref[_Node]:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def _scanned(obj: object) -> bool:
    """Whether the collector's generations (not the permanent one) hold ``obj``."""
    return any(o is obj for o in gc.get_objects())


@pytest.fixture
def heap() -> Iterator[None]:
    gc.collect()
    yield
    gc.unfreeze()  # give the rest of the test run CPython's collector as it was
    gc.collect()


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_settle_freezes_what_lives_and_ticks_freeze_what_came_since(heap: None) -> None:
    """After settle() the objects alive at start are out of the collector's scans; an object
    made afterwards is scanned until the next tick, which freezes it too, while a reference
    cycle that became garbage meanwhile is freed by that tick. Each pass is timed into the
    pause histogram and the frozen count is the gauge's value."""
    registry = Registry()
    keeper = HeapKeeper(freeze_s=10.0, full_s=0.0, registry=registry)
    early = _Node()
    settled = keeper.settle()
    assert settled.full
    assert settled.frozen == gc.get_freeze_count() > 1000
    assert not _scanned(early)

    late = _Node()
    garbage = _cycle()
    assert _scanned(late)
    assert garbage() is not None
    done = keeper.tick()
    assert not done.full
    assert garbage() is None
    assert done.collected >= 2
    assert not _scanned(late)
    assert done.frozen > settled.frozen - 100  # the earlier ones stay frozen

    samples = {(s.name, s.labels): s.value for s in registry.snapshot()}
    assert samples[(PAUSE, (("kind", "full"),))] == 1
    assert samples[(PAUSE, (("kind", "recent"),))] == 1
    assert samples[(FROZEN, ())] == done.frozen


def test_a_frozen_cycle_left_as_garbage_is_freed_by_the_full_pass(heap: None) -> None:
    """A cycle frozen while alive and dropped later is invisible to the ticks in between, and
    the first tick after ``full_s`` has passed walks the whole heap and frees it."""
    clock = _Clock()
    keeper = HeapKeeper(freeze_s=10.0, full_s=3600.0, registry=Registry(), clock=clock)
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    watched = weakref.ref(a)
    keeper.settle()
    del a, b
    clock.now = 3599.0
    assert not keeper.tick().full
    assert watched() is not None  # frozen: the tick does not look at it
    clock.now = 3600.0
    full = keeper.tick()
    assert full.full
    assert full.collected >= 2
    assert watched() is None
    clock.now = 3601.0
    assert not keeper.tick().full  # the next full pass is due an hour after this one


def test_a_keeper_needs_an_interval() -> None:
    """A keeper without a positive interval is a setting error, said at once."""
    with pytest.raises(ValueError, match="freeze_s must be positive"):
        HeapKeeper(freeze_s=0.0, full_s=0.0)
