"""Evaluation protocols over an event log: leave-one-out and prequential.

Leave-one-out: each user's last distinct item is the test target (the one before it the
validation target); models learn from every user's earlier items (the training part) and rank
all items for the user's whole history before the target, with that history masked.

Prequential: walk the log in event-time order; before each interaction, score the list the model
would show the user now; then let every model observe the interaction. The ``ranker`` is judged
the way the stream serves it: by the list it emitted after the user's previous event.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TextIO

import numpy as np

from models.evaluation.baselines import EvalModel, Ranker, Request, Step
from models.evaluation.data import Dataset, distinct_sequence
from models.evaluation.metrics import ModelRun

COLD = 5  # fewer earlier interactions than this makes a user or an item cold
BATCH = 512


class Progress:
    """A one-line progress meter on stderr: done/total, items per second, ETA."""

    def __init__(self, label: str, total: int, out: TextIO = sys.stderr) -> None:
        self.label, self.total, self.out = label, total, out
        self.start = self.last = time.monotonic()
        self.live = out.isatty()

    def update(self, done: int, *, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < 0.5:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else 0.0
        line = f"{self.label}: {done:,}/{self.total:,} ({rate:,.0f}/s, ETA {eta:,.0f} s)"
        if self.live:
            print("\r" + line, end="\n" if final else "", file=self.out, flush=True)
        elif final:
            print(line, file=self.out, flush=True)


@dataclass
class LooSplit:
    """Per user: the history to rank for, the target, and the training steps."""

    users: list[str]
    histories: list[list[Step]]
    targets: list[str]
    train: dict[str, list[Step]]


def loo_split(data: Dataset, split: str = "test") -> LooSplit:
    """Leave-one-out on distinct steps: test = last, valid = second to last."""
    users, histories, targets = [], [], []
    train: dict[str, list[Step]] = {}
    cut = 1 if split == "test" else 2
    for user, inters in data.by_user.items():
        seq = distinct_sequence(inters)
        train[user] = seq[:-2]
        if len(seq) <= cut:
            continue
        users.append(user)
        histories.append(seq[:-cut])
        targets.append(seq[-cut][0].item_id)
    return LooSplit(users, histories, targets, train)


def run_loo(
    data: Dataset, models: Sequence[EvalModel], k: int, *, masked: bool = True, split: str = "test"
) -> tuple[list[ModelRun], dict[str, int]]:
    """Fit every model on the training steps, then rank for every user's held-out target."""
    sp = loo_split(data, split)
    popularity: dict[str, int] = defaultdict(int)
    for steps in sp.train.values():
        for step in steps:
            popularity[step[0].item_id] += 1
    cold_user = np.array([len(h) < COLD for h in sp.histories])
    cold_item = np.array([popularity.get(t, 0) < COLD for t in sp.targets])
    requests = [
        Request(u, h, {s[0].item_id for s in h} if masked else set())
        for u, h in zip(sp.users, sp.histories, strict=True)
    ]
    runs = []
    for model in models:
        started = time.monotonic()
        for user, steps in sp.train.items():
            for step in steps:
                model.observe(user, step)
        progress = Progress(f"{model.name} ({split})", len(requests))
        lists: list[list[str]] = []
        for start in range(0, len(requests), BATCH):
            lists.extend(model.recommend(requests[start : start + BATCH], k))
            progress.update(len(lists))
        progress.update(len(lists), final=True)
        runs.append(
            ModelRun(
                model.name,
                lists,
                list(sp.targets),
                cold_user,
                cold_item,
                time.monotonic() - started,
            )
        )
    return runs, dict(popularity)


@dataclass
class _Tracked:
    lists: list[list[str]]
    cold_user: list[bool]
    cold_item: list[bool]
    targets: list[str]


def run_prequential(
    data: Dataset,
    models: Sequence[EvalModel],
    k: int,
    *,
    on_progress: Callable[[int], None] | None = None,
    score_from_ts: int | None = None,
) -> tuple[list[ModelRun], dict[str, int]]:
    """Walk the interactions in order: score each model's current list, then observe.

    With ``score_from_ts``, every model still observes every event, but only events at or after
    that time are scored (a trained model's training window is not scored).
    """
    steps_of: dict[str, list[Step]] = defaultdict(list)
    seen_count: dict[str, int] = defaultdict(int)
    latest: dict[str, dict[str, list[str]]] = defaultdict(dict)  # ranker name -> user -> list
    tracked = {m.name: _Tracked([], [], [], []) for m in models}
    timers = dict.fromkeys(tracked, 0.0)
    progress = Progress("prequential", len(data.interactions))
    # A ranker's list after an event matters only if the user's next event will be scored.
    next_ts: list[int | None] = [None] * len(data.interactions)
    following: dict[str, int] = {}
    for pos in range(len(data.interactions) - 1, -1, -1):
        user = data.interactions[pos].user_id
        next_ts[pos] = following.get(user)
        following[user] = data.interactions[pos].ts
    for n, inter in enumerate(data.interactions, start=1):
        history = steps_of[inter.user_id]
        upcoming = next_ts[n - 1]
        emit = upcoming is not None and (score_from_ts is None or upcoming >= score_from_ts)
        repeat = bool(history) and history[-1][-1].item_id == inter.item_id
        if repeat:
            history[-1].append(inter)  # a repeat of the same item: not a new target
        else:
            if history and (score_from_ts is None or inter.ts >= score_from_ts):
                req = Request(inter.user_id, list(history), {s[0].item_id for s in history})
                for model in models:
                    started = time.monotonic()
                    shown = (
                        latest[model.name].get(inter.user_id, [])
                        if isinstance(model, Ranker)
                        else model.recommend([req], k)[0]
                    )
                    timers[model.name] += time.monotonic() - started
                    t = tracked[model.name]
                    t.lists.append(shown)
                    t.targets.append(inter.item_id)
                    t.cold_user.append(len(history) < COLD)
                    t.cold_item.append(seen_count[inter.item_id] < COLD)
            history.append([inter])
            seen_count[inter.item_id] += 1
        _after(
            models,
            inter.user_id,
            history,
            latest=latest,
            k=k,
            timers=timers,
            observe=not repeat,
            emit=emit,
        )
        progress.update(n)
        if on_progress:
            on_progress(n)
    progress.update(len(data.interactions), final=True)
    runs = [
        ModelRun(
            name,
            t.lists,
            t.targets,
            np.array(t.cold_user, dtype=bool),
            np.array(t.cold_item, dtype=bool),
            timers[name],
        )
        for name, t in tracked.items()
    ]
    return runs, dict(seen_count)


def _after(
    models: Sequence[EvalModel],
    user: str,
    history: list[Step],
    *,
    latest: dict[str, dict[str, list[str]]],
    k: int,
    timers: dict[str, float],
    observe: bool,
    emit: bool = True,
) -> None:
    """Let models observe the user's newest step; rankers then emit the user's next list, as the
    stream does after every event (skipped when ``emit`` is false: no later target will read it).
    """
    exclude = {s[0].item_id for s in history}
    for model in models:
        started = time.monotonic()
        if observe:
            model.observe(user, history[-1])
        else:
            model.repeat(user, history[-1][-1:])
        if isinstance(model, Ranker) and emit:
            latest[model.name][user] = model.recommend([Request(user, history, exclude)], k)[0]
        timers[model.name] += time.monotonic() - started
