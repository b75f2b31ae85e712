"""eval-online: live HR/NDCG/MRR@K of recommended lists, judged by the behaviour that follows.

Consumes the behaviour and recommendation topics from the beginning; emits figures on stdout (and
a JSON report from the CLI). The judging mirrors offline prequential evaluation
("recommend from the state before each event, score, then update") with the shared rules of
:mod:`schemas.scoring`:

* a user's interactions are kept in the order they arrive (their partition's order, which is the
  order the worker saw them, and event-time order for a replay);
* the targets are :func:`schemas.scoring.next_targets` of that stream (a repeat of the same item is
  not a target);
* target T is judged by the list whose trigger is the user's latest event *before* T that has a
  list (the worker debounces bursts, so the newest event may have none): what the user was shown;
* it is scored only when T follows its previous interaction within ``window_ms`` of event time,
  else it counts as ``out_of_window``.

Lists may arrive after later behaviour (a replay at full speed outruns the worker), so scoring is
deferred: T is settled once a list triggered at or after the event just before T is known (no
older list can still come, as the worker emits a user's lists in event order), or at
:meth:`OnlineEvaluator.finish`, with the latest list known then, or as ``unmatched`` without one.
Lists whose trigger event has not been read yet wait until it is.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition

from consumers.consumer import decode_recommendation, usable
from infra.cli import UserError, load_cli_settings
from infra.kafka import consumer_config, wait_for_broker
from infra.settings import Settings
from schemas.events import BehaviorEvent, ReviewEvent
from schemas.scoring import INTERACTION_TYPES, Step, Target, hit, mrr, ndcg, next_targets
from schemas.serde import InvalidEvent, decode_input
from schemas.topics import BEHAVIOR, RECOMMENDATIONS, TopicSpec

_LIVE_EVERY_S = 2.0
_METADATA_TIMEOUT_S = 10.0


@dataclass(slots=True)
class _UserTrack:
    """One user's interactions, the lists they were shown and the targets awaiting a list."""

    positions: dict[str, int] = field(default_factory=dict)  # event id -> position in sequence
    previous: Step | None = None  # what the user's next target is compared with (next_targets)
    list_positions: list[int] = field(default_factory=list)  # sorted trigger positions
    lists: dict[int, list[str]] = field(default_factory=dict)  # trigger position -> items
    waiting: deque[tuple[int, Target]] = field(default_factory=deque)  # by position
    early: dict[str, list[str]] = field(default_factory=dict)  # trigger not read yet -> items

    def add_list(self, position: int, items: list[str]) -> None:
        if position not in self.lists:
            insort(self.list_positions, position)
        self.lists[position] = items  # a redelivered list replaces the earlier copy

    def newest_list(self) -> int:
        return self.list_positions[-1] if self.list_positions else -1

    def list_before(self, position: int) -> list[str] | None:
        """The list with the latest trigger before ``position``; older ones are dropped."""
        index = bisect_left(self.list_positions, position)
        if index == 0:
            return None
        for old in self.list_positions[: index - 1]:  # no later target can need these
            del self.lists[old]
        del self.list_positions[: index - 1]
        return self.lists[self.list_positions[0]]


class OnlineEvaluator:
    """HR/NDCG/MRR@K from a behaviour stream and the lists recommended along it (pure, no I/O)."""

    def __init__(self, k: int, window_ms: int, score_from_ts: int | None = None) -> None:
        if k < 1:
            raise ValueError(f"k must be at least 1, not {k}")
        self.k = k
        self.window_ms = window_ms
        self.score_from_ts = score_from_ts  # earlier targets are not scored (a model's training)
        self._users: dict[str, _UserTrack] = {}
        self.events = self.targets = self.scored = self.unmatched = self.out_of_window = 0
        self.stale = 0  # scored by a list triggered before the target's previous event
        self.recommendations = 0
        self._sums = {"HR": 0.0, "NDCG": 0.0, "MRR": 0.0}

    def on_behaviour(self, step: Step) -> None:
        """An interaction, in the user's event order (a redelivered event id is ignored)."""
        user = self._users.setdefault(step.user_id, _UserTrack())
        if step.event_id in user.positions:
            return
        position = len(user.positions)
        user.positions[step.event_id] = position
        self.events += 1
        previous = user.previous
        target = next(next_targets([previous, step]), None) if previous is not None else None
        if previous is None or target is not None:
            user.previous = step
        if target is not None and self.score_from_ts is not None and step.ts < self.score_from_ts:
            target = None
        if target is not None:
            self.targets += 1
            if step.ts - target.previous.ts > self.window_ms:
                self.out_of_window += 1
            else:
                user.waiting.append((position, target))
        early = user.early.pop(step.event_id, None)
        if early is not None:
            user.add_list(position, early)
        self._settle_ready(user)

    def on_recommendation(self, user_id: str, trigger_event_id: str, items: Sequence[str]) -> None:
        """A list (item ids in rank order) emitted after the user's event ``trigger_event_id``."""
        self.recommendations += 1
        user = self._users.setdefault(user_id, _UserTrack())
        position = user.positions.get(trigger_event_id)
        if position is None:
            user.early[trigger_event_id] = list(items)
            return
        user.add_list(position, list(items))
        self._settle_ready(user)

    def finish(self) -> dict[str, Any]:
        """Settle every waiting target with the latest list known (or as unmatched); report."""
        for user in self._users.values():
            while user.waiting:
                self._settle(user, *user.waiting.popleft())
        return self.report()

    def report(self) -> dict[str, Any]:
        """The figures so far; metrics are means over scored targets (0.0 before any)."""
        n = self.scored
        metrics = {
            f"{name}@{self.k}": (total / n if n else 0.0) for name, total in self._sums.items()
        }
        return {
            **metrics,
            "k": self.k,
            "window_s": self.window_ms / 1000,
            "scored": n,
            "hits": round(self._sums["HR"]),
            "unmatched": self.unmatched,  # settled without any list shown before them
            "stale_lists": self.stale,  # judged by a list from before the previous event
            "pending": sum(len(u.waiting) for u in self._users.values()),  # not settled yet
            "out_of_window": self.out_of_window,
            "targets": self.targets,
            "events": self.events,
            "recommendations": self.recommendations,
            "early_recommendations": sum(len(u.early) for u in self._users.values()),
        }

    def _settle_ready(self, user: _UserTrack) -> None:
        newest = user.newest_list()
        while user.waiting and user.waiting[0][0] - 1 <= newest:
            self._settle(user, *user.waiting.popleft())

    def _settle(self, user: _UserTrack, position: int, target: Target) -> None:
        ranked = user.list_before(position)
        if ranked is None:
            self.unmatched += 1
            return
        item = target.step.item_id
        self.scored += 1
        self.stale += user.list_positions[0] < position - 1
        self._sums["HR"] += hit(ranked, item, self.k)
        self._sums["NDCG"] += ndcg(ranked, item, self.k)
        self._sums["MRR"] += mrr(ranked, item, self.k)


# -- reading the topics ----------------------------------------------------------------------


def behaviour_step(msg: Message) -> Step | None:
    """A behaviour message as a Step, or None (undecodable or not an interaction).

    Absent ``event_id``/``ts`` get the defaults the worker's ingest gives them (the message's
    coordinates and broker time), so trigger ids in recommendations match.
    """
    topic = msg.topic() or BEHAVIOR.name
    defaults: dict[str, Any] = {"event_id": f"{topic}-{msg.partition()}-{msg.offset()}"}
    kind, stamp = msg.timestamp()
    if kind and stamp > 0:
        defaults["ts"] = stamp
    try:
        event = decode_input(msg.value(), topic=topic, defaults=defaults)
    except InvalidEvent:
        return None  # the worker dead-letters it; it is no interaction
    if event.type not in INTERACTION_TYPES or not isinstance(event, BehaviorEvent | ReviewEvent):
        return None
    return Step(event.user_id, event.item_id, event.event_id, event.ts)


def _assignment(consumer: Consumer, specs: Sequence[TopicSpec]) -> list[TopicPartition]:
    found = consumer.list_topics(timeout=_METADATA_TIMEOUT_S).topics
    parts = []
    for spec in specs:
        meta = found.get(spec.name)
        if meta is None or meta.error is not None or not meta.partitions:
            raise UserError(f"topic {spec.name} does not exist; is this recstream's broker?")
        parts += [TopicPartition(spec.name, p, OFFSET_BEGINNING) for p in sorted(meta.partitions)]
    return parts


def _feed(evaluator: OnlineEvaluator, msg: Message) -> None:
    if msg.topic() == RECOMMENDATIONS.name:
        rec = decode_recommendation(msg)
        if rec is not None:
            ranked = [i.item_id for i in sorted(rec.items, key=lambda i: i.rank)]
            evaluator.on_recommendation(rec.user_id, rec.trigger_event_id, ranked)
    elif (step := behaviour_step(msg)) is not None:
        evaluator.on_behaviour(step)


def _live_line(report: dict[str, Any], k: int) -> str:
    return (
        f"eval-online: {report['scored']:,} scored, HR@{k} {report[f'HR@{k}']:.4f}, "
        f"{report['pending']:,} waiting for a list, {report['recommendations']:,} lists read"
    )


def _consume(
    consumer: Consumer, evaluator: OnlineEvaluator, timeout_s: float | None, out: TextIO
) -> None:
    """Feed messages until none arrives for ``timeout_s`` (None: until interrupted)."""
    last_msg = last_line = time.monotonic()
    wait = 0.5 if timeout_s is None else min(0.5, timeout_s)
    while True:
        msg = usable(consumer.poll(wait))
        now = time.monotonic()
        if msg is not None:
            last_msg = now
            _feed(evaluator, msg)
        elif timeout_s is not None and now - last_msg >= timeout_s:
            return
        if now - last_line >= _LIVE_EVERY_S:
            last_line = now
            print(_live_line(evaluator.report(), evaluator.k), file=out, flush=True)


def run_online_eval(
    settings: Settings,
    k: int,
    window_s: float,
    timeout_s: float | None,
    *,
    out: TextIO | None = None,
    score_from_ts: int | None = None,
) -> dict[str, Any]:
    """Judge every recommendation on the topics from the beginning; returns the final report.

    Stops after ``timeout_s`` seconds without a message (None: at Ctrl-C), then settles the
    targets still waiting and prints the final figures on ``out`` (default: stdout).
    """
    out = out or sys.stdout
    if k < 1:
        raise UserError(f"--k must be at least 1, not {k}")
    wait_for_broker(settings.kafka)
    evaluator = OnlineEvaluator(k, round(window_s * 1000), score_from_ts)
    conf = consumer_config(
        settings.kafka, f"recstream-eval-{uuid.uuid4().hex}", **{"enable.auto.commit": False}
    )
    consumer = Consumer(conf)
    try:
        consumer.assign(_assignment(consumer, (BEHAVIOR, RECOMMENDATIONS)))
        _consume(consumer, evaluator, timeout_s, out)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how an open-ended run ends: report what was read
    finally:
        consumer.close()
    report = evaluator.finish()
    print(
        f"eval-online: {report['targets']:,} targets: {report['scored']:,} scored, "
        f"{report['unmatched']:,} without a list, {report['out_of_window']:,} out of window",
        file=out,
    )
    print(
        "  ".join(f"{name}@{k} {report[f'{name}@{k}']:.4f}" for name in ("HR", "NDCG", "MRR")),
        file=out,
        flush=True,
    )
    return report


def cli_eval_online(args: argparse.Namespace) -> int:
    """``recstream eval-online``: live figures, then the final ones (and ``--json PATH``)."""
    settings = load_cli_settings(args)
    report = run_online_eval(
        settings, args.k, args.window, args.timeout, score_from_ts=args.from_ts
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        print(f"wrote {args.json}")
    return 0
