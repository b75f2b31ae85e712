"""The online evaluator: judging rules on hand-built streams, the CLI on a broker, the stack."""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path

import pytest
from clirun import run_cli
from confluent_kafka import Producer

from consumers.online_eval import OnlineEvaluator, run_online_eval
from infra.kafka import producer_config
from infra.settings import Settings
from producers.demo.data import catalog
from schemas.events import RecommendationEvent, RecommendedItem
from schemas.scoring import Step, hit, mrr, ndcg, next_targets
from schemas.serde import encode
from schemas.topics import BEHAVIOR, ENCODE_REQUESTS, RECOMMENDATIONS

T0 = 1_700_000_000_000
MINUTE = 60_000


def _step(user: str, item: str, n: int, ts: int | None = None) -> Step:
    """The user's n-th event, on ``item``, one minute after the previous by default."""
    return Step(user, item, f"{user}-{n}", T0 + n * MINUTE if ts is None else ts)


def _evaluator(k: int = 3, window_ms: int = 3_600_000) -> OnlineEvaluator:
    return OnlineEvaluator(k, window_ms)


def test_a_hit_and_a_miss_give_the_expected_hr_ndcg_and_mrr() -> None:
    """A target at rank 2 of its list and one outside the top K average to HR 0.5,
    NDCG (1/log2 3)/2 and MRR 0.25."""
    ev = _evaluator(k=3)
    ev.on_behaviour(_step("u", "a", 0))
    ev.on_recommendation("u", "u-0", ["x", "b", "y", "z"])
    ev.on_behaviour(_step("u", "b", 1))  # rank 2: a hit
    ev.on_recommendation("u", "u-1", ["x", "y", "z", "c"])
    ev.on_behaviour(_step("u", "c", 2))  # rank 4, outside the top 3: a miss
    report = ev.report()
    assert report["scored"] == 2
    assert report["hits"] == 1
    assert report["HR@3"] == 0.5
    assert report["NDCG@3"] == pytest.approx(1 / math.log2(3) / 2)
    assert report["MRR@3"] == pytest.approx(0.25)
    assert report["unmatched"] == 0
    assert report["pending"] == 0
    assert report["recommendations"] == 2
    assert set(report) >= {"HR@3", "NDCG@3", "MRR@3", "scored", "hits", "unmatched"}


def test_targets_before_score_from_ts_are_not_scored() -> None:
    """With a scoring start (a trained model's ``trained_until_ts``), a target before it is not
    counted; the next one after it is judged by the list shown before it."""
    ev = OnlineEvaluator(3, 3_600_000, score_from_ts=T0 + 2 * MINUTE)
    ev.on_behaviour(_step("u", "a", 0))
    ev.on_recommendation("u", "u-0", ["b", "x", "y"])
    ev.on_behaviour(_step("u", "b", 1))  # a hit, but before the start: not scored
    ev.on_recommendation("u", "u-1", ["x", "y", "z"])
    ev.on_behaviour(_step("u", "c", 2))  # at the start: scored, a miss
    report = ev.finish()
    assert report["targets"] == 1
    assert report["scored"] == 1
    assert report["HR@3"] == 0.0


def test_a_repeat_of_the_same_item_is_not_a_target() -> None:
    """A second event on the same item (a review after a purchase) is not scored, and the
    following target is still judged by the list shown just before it."""
    ev = _evaluator()
    ev.on_behaviour(_step("u", "a", 0))
    ev.on_recommendation("u", "u-0", ["a", "z"])
    ev.on_behaviour(_step("u", "a", 1))  # repeat: would be a hit if it were scored
    ev.on_recommendation("u", "u-1", ["b", "z"])
    ev.on_behaviour(_step("u", "b", 2))
    report = ev.report()
    assert report["targets"] == 1
    assert report["scored"] == 1
    assert report["HR@3"] == 1.0  # judged by the list after the repeat (trigger u-1)
    assert report["MRR@3"] == 1.0


def test_a_list_arriving_after_the_next_behaviour_is_still_used() -> None:
    """When the worker's list for event n arrives after event n+1 was read, the target waits
    for it and is then scored with it, not counted as unmatched."""
    ev = _evaluator()
    ev.on_behaviour(_step("u", "a", 0))
    ev.on_behaviour(_step("u", "b", 1))
    before = ev.report()
    assert (before["scored"], before["pending"], before["unmatched"]) == (0, 1, 0)
    ev.on_recommendation("u", "u-0", ["z", "b"])
    after = ev.report()
    assert (after["scored"], after["pending"], after["unmatched"]) == (1, 0, 0)
    assert after["HR@3"] == 1.0
    assert after["MRR@3"] == 0.5


def test_an_older_list_is_used_when_the_newest_event_has_none() -> None:
    """With a debounced burst (events 1 and 2 in one batch, one list triggered by 2), the target
    at 2 is judged by the list of event 0, the last one the user was shown."""
    ev = _evaluator()
    ev.on_behaviour(_step("u", "a", 0))
    ev.on_behaviour(_step("u", "b", 1))
    ev.on_behaviour(_step("u", "c", 2))
    ev.on_recommendation("u", "u-0", ["b", "c"])
    ev.on_recommendation("u", "u-2", ["q", "r"])  # no list for u-1: debounced
    report = ev.report()
    assert report["scored"] == 2
    assert report["HR@3"] == 1.0  # b at rank 1 and c at rank 2 of the list of u-0
    assert report["MRR@3"] == pytest.approx((1 + 0.5) / 2)
    assert report["stale_lists"] == 1  # the target at 2, judged by the list of u-0, not of u-1


def test_a_target_waits_until_finish_then_uses_the_latest_list_or_is_unmatched() -> None:
    """A target whose newest preceding event never gets a list is settled at finish with the
    latest older list; a user who was never shown a list before a target counts as unmatched."""
    ev = _evaluator()
    ev.on_behaviour(_step("u", "a", 0))
    ev.on_recommendation("u", "u-0", ["z", "c"])
    ev.on_behaviour(_step("u", "b", 1))  # scored at once (miss): the list of u-0 is known
    ev.on_behaviour(_step("u", "c", 2))  # waits: u-1 may still get a list
    ev.on_behaviour(_step("v", "a", 0))
    ev.on_behaviour(_step("v", "b", 1))  # v was never shown anything
    assert ev.report()["pending"] == 2
    final = ev.finish()
    assert final["pending"] == 0
    assert final["scored"] == 2
    assert final["hits"] == 1  # c at rank 2 of the list of u-0
    assert final["unmatched"] == 1
    assert final["HR@3"] == 0.5


def test_targets_outside_the_window_are_not_scored() -> None:
    """A next event more than ``window_ms`` of event time after the previous one is counted as
    out of window and neither scored nor left waiting."""
    ev = _evaluator(window_ms=10 * MINUTE)
    ev.on_behaviour(_step("u", "a", 0, ts=T0))
    ev.on_recommendation("u", "u-0", ["b"])
    ev.on_behaviour(_step("u", "b", 1, ts=T0 + 10 * MINUTE + 1))  # a hit, but too late
    ev.on_recommendation("u", "u-1", ["x"])
    ev.on_behaviour(_step("u", "c", 2, ts=T0 + 20 * MINUTE + 1))  # exactly the window: scored
    report = ev.finish()
    assert report["targets"] == 2
    assert report["out_of_window"] == 1
    assert report["scored"] == 1
    assert report["HR@3"] == 0.0


def test_lists_for_unknown_triggers_wait_for_their_trigger() -> None:
    """A list read before its trigger event is held, then attached to that event when it
    arrives, and the target after it is scored with it."""
    ev = _evaluator()
    ev.on_recommendation("u", "u-0", ["b"])
    ev.on_recommendation("u", "u-9", ["never"])  # its trigger never comes
    assert ev.report()["early_recommendations"] == 2
    ev.on_behaviour(_step("u", "a", 0))
    ev.on_behaviour(_step("u", "b", 1))
    report = ev.finish()
    assert report["scored"] == 1
    assert report["HR@3"] == 1.0
    assert report["early_recommendations"] == 1
    assert report["recommendations"] == 2


def test_a_redelivered_event_is_counted_once() -> None:
    """At-least-once delivery can repeat a behaviour message; its event id is judged once."""
    ev = _evaluator()
    ev.on_behaviour(_step("u", "a", 0))
    ev.on_recommendation("u", "u-0", ["b"])
    ev.on_behaviour(_step("u", "b", 1))
    ev.on_behaviour(_step("u", "b", 1))
    report = ev.finish()
    assert (report["events"], report["targets"], report["scored"]) == (2, 1, 1)


def test_with_a_list_after_every_event_online_equals_offline_prequential() -> None:
    """Given the list of every event, in any arrival order of lists, online scores equal the
    offline rule: each target of next_targets judged by the list of the event just before it."""
    rng = random.Random(7)
    users, items = ["u", "v", "w"], [f"i{n}" for n in range(6)]
    counts = dict.fromkeys(users, 0)
    steps, lists = [], {}
    for _ in range(200):
        user = rng.choice(users)
        step = _step(user, rng.choice(items), counts[user])
        counts[user] += 1
        steps.append(step)
        lists[step.event_id] = rng.sample(items, 4)
    before: dict[str, Step] = {}
    previous_event: dict[str, str] = {}
    for step in steps:
        previous_event[step.event_id] = (
            before[step.user_id].event_id if step.user_id in before else ""
        )
        before[step.user_id] = step
    expected = [
        (
            hit(ranked, t.step.item_id, 3),
            ndcg(ranked, t.step.item_id, 3),
            mrr(ranked, t.step.item_id, 3),
        )
        for t in next_targets(steps)
        for ranked in [lists[previous_event[t.step.event_id]]]
    ]

    ev = _evaluator()
    late = []
    for step in steps:
        ev.on_behaviour(step)
        late.append(step)
        if rng.random() < 0.5:  # lists lag behind behaviour by a random amount
            for s in late:
                ev.on_recommendation(s.user_id, s.event_id, lists[s.event_id])
            late.clear()
    for s in late:
        ev.on_recommendation(s.user_id, s.event_id, lists[s.event_id])
    report = ev.finish()

    assert report["scored"] == len(expected) > 50
    assert report["unmatched"] == 0
    assert report["HR@3"] == pytest.approx(sum(e[0] for e in expected) / len(expected))
    assert report["NDCG@3"] == pytest.approx(sum(e[1] for e in expected) / len(expected))
    assert report["MRR@3"] == pytest.approx(sum(e[2] for e in expected) / len(expected))


# -- on a broker ----------------------------------------------------------------------------


def test_cli_eval_online_reads_both_topics_and_writes_the_json_report(
    settings: Settings, tmp_path: Path
) -> None:
    """`recstream eval-online --json` decodes behaviour (ids defaulted as ingest defaults them,
    undecodable messages ignored) and recommendations from the topics and writes the figures."""
    producer = Producer(producer_config(settings.kafka))
    for value in (
        {"type": "click", "user_id": "u", "item_id": "a"},  # no event_id: ingest names it by offset
        b"{not json",
        {"type": "click", "user_id": "u", "item_id": "b", "event_id": "e2"},
    ):
        raw = value if isinstance(value, bytes) else json.dumps(value).encode()
        producer.produce(BEHAVIOR.name, key=b"u", value=raw)
    rec = RecommendationEvent(
        user_id="u",
        trigger_event_id=f"{BEHAVIOR.name}-0-0",
        model_version="test",
        latency_ms=1.0,
        items=[
            RecommendedItem(item_id=item, rank=rank, score=1.0 / rank, reasons=["r"])
            for item, rank in (("b", 2), ("c", 1))
        ],
    )
    producer.produce(RECOMMENDATIONS.name, key=b"u", value=encode(rec))
    assert producer.flush(10) == 0
    env = {"RECSTREAM_BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers}
    path = tmp_path / "out" / "online.json"
    args = ["eval-online", "--k", "10", "--timeout", "2", "--json", str(path)]

    done = run_cli(args, cwd=tmp_path, env=env)

    assert done.returncode == 0, done.stderr
    report = json.loads(path.read_text())
    assert (report["events"], report["targets"], report["scored"]) == (2, 1, 1)
    assert report["HR@10"] == 1.0
    assert report["MRR@10"] == 0.5
    assert report["NDCG@10"] == pytest.approx(1 / math.log2(3))
    assert "HR@10 1.0000  NDCG@10 0.6309  MRR@10 0.5000" in done.stdout


# -- on the real stack -----------------------------------------------------------------------

#: Per user: the first item, then for each later click the rank in the last list to pick
#: (a hit at that rank) or None (an item not in the last list: a miss).
_PLANS = {
    "ana": ("scifi-001", [1, 3]),
    "ben": ("cook-001", [None, 2]),
    "cid": ("garden-001", [None, None]),
}


def _for(user: str, trigger: str):
    return lambda body: body.get("user_id") == user and body.get("trigger_event_id") == trigger


@pytest.mark.stack
def test_run_online_eval_on_the_stack_matches_a_hand_computed_hr(stack) -> None:
    """After users click through the live stack (each click waits for its list), the online
    evaluator scores every target, and its HR@10 equals the hit rate computed by hand from the
    lists the stack emitted."""
    items = catalog()
    stack.publish(*items)
    stack.wait_committed(ENCODE_REQUESTS.name, len(items))
    all_ids = [i["item_id"] for i in items]
    expected_hits: list[float] = []
    for user, (first, picks) in _PLANS.items():
        stack.publish({"type": "click", "user_id": user, "item_id": first, "event_id": f"{user}-0"})
        last = stack.wait_for(_for(user, f"{user}-0"), f"list after {user}-0")
        clicked = {first}
        for n, rank in enumerate(picks, start=1):
            shown = [i["item_id"] for i in sorted(last["items"], key=lambda i: i["rank"])]
            if rank is None:
                item = next(i for i in all_ids if i not in shown and i not in clicked)
            else:
                item = shown[rank - 1]
            clicked.add(item)
            expected_hits.append(hit(shown, item, 10))
            event_id = f"{user}-{n}"
            stack.publish({"type": "click", "user_id": user, "item_id": item, "event_id": event_id})
            last = stack.wait_for(_for(user, event_id), f"list after {event_id}")

    out = io.StringIO()
    report = run_online_eval(stack.settings, k=10, window_s=3600, timeout_s=5, out=out)

    n_targets = sum(len(picks) for _, picks in _PLANS.values())
    assert report["targets"] == n_targets
    assert report["scored"] == n_targets
    assert report["unmatched"] == 0
    assert 0.0 <= report["HR@10"] <= 1.0
    assert report["HR@10"] == pytest.approx(sum(expected_hits) / n_targets)
    assert report["HR@10"] == pytest.approx(3 / 6)  # the plans: three picks from the list
    assert report["MRR@10"] == pytest.approx((1 + 1 / 3 + 1 / 2) / 6)
    assert "HR@10 0.5000" in out.getvalue()
