"""End to end on the embedded stack: real broker, real Faust worker, real encoder, Qdrant Edge."""

from __future__ import annotations

import base64
import json

import pytest
from clirun import run_cli

from producers.demo.data import catalog
from schemas.topics import BEHAVIOR, ENCODE_REQUESTS

pytestmark = pytest.mark.stack

SCIFI_CLICKS = ["scifi-001", "scifi-002", "scifi-003"]


def _publish_catalogue(stack) -> list[dict]:
    items = catalog()
    stack.publish(*items)
    stack.wait_committed(ENCODE_REQUESTS.name, len(items))
    return items


def _for(user: str, trigger: str):
    return lambda body: body.get("user_id") == user and body.get("trigger_event_id") == trigger


def test_recommendation_arrives_excludes_purchases_and_explains_every_item(stack):
    """A user who clicked three sci-fi books and bought a fourth gets a sci-fi-led list on the
    recommendation topic, without the bought or unavailable items, each item with a reason."""
    _publish_catalogue(stack)
    clicks = [
        {"type": "click", "user_id": "ada", "item_id": i, "event_id": f"c-{i}"}
        for i in SCIFI_CLICKS
    ]
    purchase = {"type": "purchase", "user_id": "ada", "item_id": "scifi-004", "event_id": "p-1"}
    stack.publish(*clicks, purchase)

    rec = stack.wait_for(_for("ada", "p-1"), "recommendation after the purchase")

    ids = [item["item_id"] for item in rec["items"]]
    assert len(ids) == 10
    assert "scifi-004" not in ids  # bought
    assert "scifi-017" not in ids  # unavailable in the catalogue
    assert not set(SCIFI_CLICKS) & set(ids)  # already seen
    assert sum(i.startswith("scifi-") for i in ids) >= 6, ids
    assert all(item["reasons"] and all(r.strip() for r in item["reasons"]) for item in rec["items"])
    assert rec["items"][0]["reasons"][0].startswith("because you")
    assert [item["rank"] for item in rec["items"]] == list(range(1, 11))
    assert rec["model_version"].startswith("untrained+all-MiniLM-L6-v2@")
    assert rec["latency_ms"] >= 0


def test_cold_start_item_is_recommended_once_embedded(stack):
    """An item published after the user's history, with no behaviour on it, is recommended to a
    user whose taste matches its text as soon as the encoder has embedded it."""
    items = _publish_catalogue(stack)
    stack.publish(
        *[
            {"type": "click", "user_id": "dev", "item_id": i, "event_id": f"d-{i}"}
            for i in SCIFI_CLICKS
        ]
    )
    first = stack.wait_for(_for("dev", "d-scifi-003"), "first recommendation")
    assert "scifi-900" not in [i["item_id"] for i in first["items"]]

    template = next(i for i in items if i["item_id"] == "scifi-002")
    new_item = {
        **template,
        "item_id": "scifi-900",
        "event_id": "new-item",
        "title": template["title"] + ": the sequel",
    }
    stack.publish(new_item)
    stack.wait_committed(ENCODE_REQUESTS.name, len(items) + 1)
    stack.publish({"type": "view", "user_id": "dev", "item_id": "scifi-005", "event_id": "d-2"})

    rec = stack.wait_for(_for("dev", "d-2"), "recommendation after the new item")
    ids = [i["item_id"] for i in rec["items"]]
    assert "scifi-900" in ids[:5], ids


def test_malformed_events_are_dead_lettered_and_good_ones_still_processed(stack):
    """Bad bytes, an out-of-range rating and an unknown type each land on the dead-letter topic
    with their reason and original bytes, and a later good event still yields a recommendation."""
    _publish_catalogue(stack)
    bad = {
        "bad_json": b"{not json",
        "invalid_field": json.dumps(
            {"type": "rating", "user_id": "bo", "item_id": "cook-001", "value": 11}
        ).encode(),
        "unknown_type": json.dumps(
            {"type": "wishlist", "user_id": "bo", "item_id": "cook-001"}
        ).encode(),
    }
    for payload in bad.values():
        stack.publish_raw(BEHAVIOR.name, "bo", payload)
    stack.publish({"type": "click", "user_id": "bo", "item_id": "cook-002", "event_id": "good"})

    rec = stack.wait_for(_for("bo", "good"), "recommendation after the good event")
    assert rec["items"]
    for error_type, payload in bad.items():
        letter = stack.wait_for(
            lambda b, t=error_type: b.get("type") == "dead_letter" and b["error_type"] == t,
            f"dead letter {error_type}",
        )
        assert base64.b64decode(letter["payload_b64"]) == payload
        assert letter["topic"] == BEHAVIOR.name
        assert letter["stage"] == "validate-input"
        assert letter["error"]
    assert len(stack.dead_letters) == 3


def test_review_text_shapes_the_list_and_its_reasons(stack):
    """A review is embedded into the user's text vector and the list then cites that review."""
    _publish_catalogue(stack)
    review = {
        "type": "review",
        "user_id": "cy",
        "item_id": "coffee-001",
        "event_id": "r-1",
        "rating": 5,
        "text": "Brews a clean, bright pour-over; I use it every morning "
        "with a gooseneck kettle and light roast beans.",
    }
    stack.publish(review)
    rec = stack.wait_for(
        lambda b: (
            b.get("user_id") == "cy"
            and any("your review" in r for i in b.get("items", []) for r in i["reasons"])
        ),
        "recommendation citing the review",
    )
    ids = [i["item_id"] for i in rec["items"]]
    assert "coffee-001" not in ids  # reviewed = consumed
    assert sum(i.startswith("coffee-") for i in ids) >= 5, ids


def test_cli_publish_then_tail_round_trip(stack, tmp_path):
    """`recstream publish FILE` routes a JSONL file of items and clicks to their topics and
    `recstream tail --user --json` prints the user's recommendation as one JSON line."""
    items = catalog()
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(json.dumps(i) for i in items) + "\n")
    env = {
        "RECSTREAM_BOOTSTRAP_SERVERS": stack.settings.kafka.bootstrap_servers,
        "RECSTREAM_KAFKA__PARTITIONS": "1",
    }
    done = run_cli(["publish", str(events)], env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"published {len(items)} events" in done.stdout
    stack.wait_committed(ENCODE_REQUESTS.name, len(items))

    clicks = tmp_path / "clicks.jsonl"
    clicks.write_text(
        "".join(
            json.dumps({"type": "click", "user_id": "eve", "item_id": i}) + "\n"
            for i in ("garden-001", "garden-002")
        )
    )
    done = run_cli(["publish", str(clicks)], env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    tailed = run_cli(
        ["tail", "--user", "eve", "--max", "1", "--timeout", "60", "--json"], env=env, timeout=120
    )
    assert tailed.returncode == 0, tailed.stderr
    (line,) = tailed.stdout.strip().splitlines()
    rec = json.loads(line)
    assert rec["user_id"] == "eve"
    ids = [i["item_id"] for i in rec["items"]]
    assert sum(i.startswith("garden-") for i in ids) >= 5, ids
