"""The web console's parts without a browser: the operations arithmetic, evaluation runs, the
publishing endpoint, the recommendation and dead-letter feeds over the real embedded broker, and
the ``recstream console`` command's errors."""

from __future__ import annotations

import base64
import json
import math
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clirun import run_cli
from confluent_kafka import Producer

from consumers.consumer import read_topic
from infra.broker import free_port
from infra.kafka import producer_config
from infra.metrics import Registry, parse, render
from infra.settings import Settings, load_settings
from producers.producer import BehaviorProducer
from schemas.events import DeadLetter, RecommendationEvent, RecommendedItem
from schemas.privacy import pseudonym_for
from schemas.topics import BEHAVIOR, DEAD_LETTER, RECOMMENDATIONS
from streams.console import start_console
from streams.console.app import BadRequest, publish_event
from streams.console.evals import find_runs, served_file
from streams.console.ops import OpsHistory, Totals, quantile, totals
from streams.ingest import STEP as INGEST_STEP
from streams.observe import ENCODER_TEXTS, EVENTS, LAG, LATENCY, MODEL_INFO
from streams.observe import RECOMMENDATIONS as RECOMMENDATIONS_TOTAL


def test_quantile_interpolates_inside_its_bucket_as_prometheus_does() -> None:
    """Percentiles come from cumulative buckets by linear interpolation, the +Inf bucket answers
    its lower bound, and an empty histogram has no percentile."""
    buckets = [(0.01, 10.0), (0.1, 30.0), (math.inf, 30.0)]
    assert quantile(0.5, buckets) == pytest.approx(0.01 + 0.09 * 5 / 20)
    assert quantile(0.99, buckets) == pytest.approx(0.01 + 0.09 * 19.7 / 20)
    assert quantile(0.25, buckets) == pytest.approx(0.01 * 7.5 / 10)
    assert quantile(0.99, [(0.01, 0.0), (math.inf, 4.0)]) == 0.01
    assert quantile(0.5, [(0.01, 0.0), (math.inf, 0.0)]) is None


def test_totals_add_up_every_worker_and_count_only_ingest_events() -> None:
    """Two workers' real /metrics text, parsed back: events are the ingest step's only, counters
    and histogram buckets add up across workers, lag is summed per topic, and only the model whose
    info gauge is 1 is served."""
    scrapes = []
    for n in (1, 2):
        registry = Registry()
        registry.counter(EVENTS, topic="behavior.events.v1", agent=INGEST_STEP).inc(100 * n)
        registry.counter(EVENTS, topic="recstream.user-updates.v1", agent="update-user-state").inc(
            999
        )
        registry.counter(RECOMMENDATIONS_TOTAL).inc(10 * n)
        registry.counter(ENCODER_TEXTS).inc(n)
        registry.histogram(LATENCY).observe(0.004 * n)
        registry.gauge(LAG, topic="behavior.events.v1", partition=str(n)).set(5 * n)
        registry.gauge(MODEL_INFO, model="ranker", version="v1").set(0)
        registry.gauge(MODEL_INFO, model="trained", version="v2").set(1)
        scrapes.append(parse(render(registry)))
    summed = totals(scrapes)
    assert summed.events == 300
    assert summed.recommendations == 30
    assert summed.encoder_texts == 3
    assert summed.lag == {"behavior.events.v1": 15}
    assert summed.models == (("trained", "v2"),)
    assert summed.latency_buckets[-1] == (math.inf, 2.0)
    assert quantile(1.0, summed.latency_buckets) is not None


def test_ops_history_rates_over_the_window_and_survives_a_worker_restart() -> None:
    """Rates divide the growth over the last window by its seconds; a counter that went down
    (a restarted worker) counts from zero instead of giving a negative rate; latency percentiles
    cover only the lists sent within the window."""
    history = OpsHistory(window_s=10.0)
    slow = ((0.01, 0.0), (1.0, 100.0), (math.inf, 100.0))
    fast = ((0.01, 50.0), (1.0, 150.0), (math.inf, 150.0))
    first = history.add(0, Totals(events=0, latency_buckets=slow), 0)
    assert first.events_per_s == 0.0
    assert first.latency_ms["p50"] is None
    for second in range(1, 11):
        point = history.add(second * 1000, Totals(events=100 * second, latency_buckets=slow), 0)
    assert point.events_per_s == pytest.approx(100.0)
    assert point.latency_ms["p50"] is None  # nothing new in the window
    # Second 11: 50 more lists, all fast; the window now starts at second 1.
    point = history.add(11_000, Totals(events=1100, latency_buckets=fast), 2)
    assert point.events_per_s == pytest.approx(100.0)
    assert point.latency_ms["p50"] == pytest.approx(5.0)  # 0.01 s * 25/50, in ms
    assert point.dead_letters_total == 2
    # The worker restarts: its counter starts again at 40.
    point = history.add(12_000, Totals(events=40, latency_buckets=fast), 2)
    assert point.events_per_s >= 0
    assert point.events_total == 40
    assert len(history.points) == 13


def _results(folder: Path, dataset: str, hr: float) -> None:
    folder.mkdir(parents=True)
    body = {
        "dataset": dataset,
        "protocol": "loo",
        "ks": [10],
        "command": f"recstream eval {dataset}.parquet --out {folder}",
        "models": {"covisit": {"HR@10": hr, "NDCG@10": hr / 2, "targets": 5, "seconds": 0.1}},
        "slices": {},
    }
    (folder / "results.json").write_text(json.dumps(body))
    (folder / "metrics_vs_k.png").write_bytes(b"\x89PNG\r\n\x1a\n")


def test_evaluation_runs_are_found_newest_first_and_files_stay_inside(tmp_path: Path) -> None:
    """Runs up to three folders down are listed newest first with their plots; a broken
    results.json is skipped; only png, md and json files inside the eval folder are served."""
    root = tmp_path / "eval"
    _results(root / "older", "sci", 0.1)
    time.sleep(0.02)
    _results(root / "nested" / "newer", "inst", 0.2)
    (root / "broken").mkdir()
    (root / "broken" / "results.json").write_text("{not json")
    (tmp_path / "secret.png").write_bytes(b"x")
    runs = find_runs(root)
    assert [r["id"] for r in runs] == ["nested/newer", "older"]
    assert runs[0]["plots"] == ["/eval-files/nested/newer/metrics_vs_k.png"]
    assert runs[0]["models"]["covisit"]["HR@10"] == 0.2
    assert find_runs(tmp_path / "missing") == []
    assert served_file(root, "older/results.json") == (root / "older" / "results.json").resolve()
    assert served_file(root, "../secret.png") is None
    assert served_file(root, "older/../../secret.png") is None
    assert served_file(root, "older/missing.png") is None
    (root / "older" / "notes.py").write_text("x = 1")
    assert served_file(root, "older/notes.py") is None


def test_publish_event_sends_real_events_and_refuses_bad_ones(settings: Settings) -> None:
    """A click and a review from the storefront land on the behaviour topic as the stream's own
    events; a wrong kind, a missing id, a review without text or a bad rating are refused with a
    one-line reason and nothing is sent for them."""
    with BehaviorProducer(settings, source="console") as producer:
        click = publish_event(producer, {"kind": "click", "user_id": "u1", "item_id": "i1"})
        review = publish_event(
            producer,
            {"kind": "review", "user_id": "u1", "item_id": "i2", "text": " Great ", "rating": 5},
        )
        bad = [
            ([1, 2], "JSON object"),
            ({"kind": "teleport", "user_id": "u1", "item_id": "i1"}, "kind must be one of"),
            ({"kind": "click", "user_id": "", "item_id": "i1"}, "user_id must be"),
            ({"kind": "click", "user_id": "u1"}, "item_id must be"),
            ({"kind": "review", "user_id": "u1", "item_id": "i1"}, "needs its text"),
            (
                {"kind": "review", "user_id": "u1", "item_id": "i1", "text": "x", "rating": "5"},
                "rating must be",
            ),
            (
                {"kind": "review", "user_id": "u1", "item_id": "i1", "text": "x", "rating": 9},
                "rating",
            ),
        ]
        for body, reason in bad:
            with pytest.raises(BadRequest, match=reason) as caught:
                publish_event(producer, body)
            assert "\n" not in str(caught.value)
        assert producer.flush(10) == 0
    sent = [json.loads(m.value()) for m in read_topic(settings, BEHAVIOR, timeout_s=3)]
    assert [(e["type"], e["event_id"]) for e in sent] == [
        ("click", click["event_id"]),
        ("review", review["event_id"]),
    ]
    assert sent[1]["text"] == "Great"
    assert sent[1]["rating"] == 5
    assert all(e["source"] == "console" for e in sent)


@pytest.fixture
def console(settings: Settings, tmp_path: Path) -> Iterator[Any]:
    """A console on a free loopback port against the test's broker, reading one worker URL where
    nothing listens."""
    dead = f"http://127.0.0.1:{free_port()}"
    server = start_console(settings, port=0, worker_urls=[dead], eval_dir=tmp_path / "eval")
    for feed in (server.console.catalogue, server.console.recs, server.console.dead_letters):
        assert feed.ready.wait(20), "a console feed never got its partitions"
    try:
        yield server
    finally:
        server.stop()


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _post(url: str, body: bytes) -> tuple[int, Any]:
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _read_sse(url: str, events: list[dict]) -> None:
    """Read the stream at ``url`` until its first recommendation, appended to ``events``."""
    with urllib.request.urlopen(url, timeout=30) as stream:
        name = None
        for raw in stream:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: ") and name == "recommendation":
                events.append(json.loads(line[6:]))
                return


def test_console_serves_pages_publishes_and_streams_lists(console: Any, settings: Settings) -> None:
    """Over HTTP: the three pages are served; POST /api/events answers 202 with the event id and
    the event is on the behaviour topic, bad JSON gets 400 with a reason; a list published on the
    recommendation topic reaches the user's server-sent-event stream with the catalogue's titles;
    a worker that cannot be reached is reported down with its error."""
    base = console.url
    for page in ("", "ops", "eval"):
        with urllib.request.urlopen(base + page, timeout=10) as r:
            assert r.status == 200
            assert "<html" in r.read().decode().lower()
    with BehaviorProducer(settings, source="test") as producer:
        producer.item("i1", "The Salt Orbit", "a comet", categories=["Science fiction"])
    deadline = time.monotonic() + 20
    while not _get(base + "api/catalogue")["items"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _get(base + "api/catalogue")["items"][0]["title"] == "The Salt Orbit"

    status, body = _post(
        base + "api/events", b'{"kind": "click", "user_id": "u7", "item_id": "i1"}'
    )
    assert status == 202
    assert body["kind"] == "click"
    status, error = _post(base + "api/events", b"{oops")
    assert (status, error) == (400, {"error": "the body is not JSON"})
    sent = [json.loads(m.value()) for m in read_topic(settings, BEHAVIOR, timeout_s=3)]
    assert [e["event_id"] for e in sent] == [body["event_id"]]

    received: list[dict] = []
    reader = threading.Thread(
        target=_read_sse,
        args=(base + "api/users/u7/recommendations/stream", received),
        daemon=True,
    )
    reader.start()
    deadline = time.monotonic() + 10
    while not console.console.recs._watchers and time.monotonic() < deadline:
        time.sleep(0.05)
    rec = RecommendationEvent(
        user_id="u7",
        trigger_event_id=body["event_id"],
        model_version="test-1",
        latency_ms=12.5,
        items=[RecommendedItem(item_id="i1", rank=1, score=0.9, reasons=["because you clicked"])],
    )
    producer = Producer(producer_config(settings.kafka))
    producer.produce(RECOMMENDATIONS.name, key=b"u7", value=rec.model_dump_json().encode())
    assert producer.flush(10) == 0
    reader.join(20)
    assert len(received) == 1
    got = received[0]
    assert got["trigger_event_id"] == body["event_id"]
    assert got["source"] == "stream"
    assert got["items"][0]["title"] == "The Salt Orbit"
    assert got["items"][0]["reasons"] == ["because you clicked"]

    ops = _get(base + "api/ops")
    assert ops["workers"][0]["up"] is False
    assert ops["workers"][0]["error"]
    assert ops["history"], "the console records a point a second even with no worker up"
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(base + "eval-files/../pyproject.toml", timeout=10)
    assert missing.value.code == 404


def test_dead_letters_are_counted_by_reason_with_their_original_bytes(
    console: Any, settings: Settings
) -> None:
    """Letters on the dead-letter topic are counted by stage and reason, newest first, and each
    carries the rejected input's bytes decoded for reading and intact in base64."""
    original = b'{"type": "click", "user_id": 42}'
    producer = Producer(producer_config(settings.kafka))
    for n, reason in enumerate(["invalid_field", "invalid_field", "bad_json"]):
        letter = DeadLetter(
            stage="validate-input",
            topic=BEHAVIOR.name,
            partition=0,
            offset=n,
            error_type=reason,
            error=f"rejected {n}",
            payload_b64=base64.b64encode(original + str(n).encode()).decode(),
        )
        producer.produce(DEAD_LETTER.name, key=b"behavior", value=letter.model_dump_json().encode())
    producer.produce(DEAD_LETTER.name, key=b"x", value=b"\xff not a letter")
    assert producer.flush(10) == 0
    deadline = time.monotonic() + 20
    while console.console.dead_letters.total < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    letters = _get(console.url + "api/dead-letters")
    assert letters["by_reason"][0] == {
        "stage": "validate-input",
        "reason": "invalid_field",
        "count": 2,
    }
    assert {(r["reason"], r["count"]) for r in letters["by_reason"][1:]} == {
        ("bad_json", 1),
        ("unreadable_dead_letter", 1),
    }
    newest_letter = letters["recent"][1]
    assert newest_letter["payload_text"] == original.decode() + "2"
    assert base64.b64decode(newest_letter["payload_b64"]) == original + b"2"
    assert letters["recent"][0]["payload_text"] == "\ufffd not a letter"
    ops = _get(console.url + "api/ops")
    assert ops["dead_letters"]["recent"][1]["payload_bytes"] == len(original) + 1


def test_console_command_says_what_is_wrong_in_one_line(settings: Settings, tmp_path: Path) -> None:
    """`recstream console` with an eval folder that is a file, a port that is taken, or a port
    that is not a number exits non-zero with one line and no traceback."""
    env = {"RECSTREAM_BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers}
    a_file = tmp_path / "results.json"
    a_file.write_text("{}")
    done = run_cli(["console", "--port", "0", "--eval-dir", str(a_file)], env=env)
    assert done.returncode != 0
    assert done.stderr.strip() == f"recstream: error: --eval-dir {a_file} is a file, not a folder"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = run_cli(["console", "--port", str(port)], env=env)
    assert done.returncode != 0
    assert done.stderr.strip().startswith(
        f"recstream: error: the console cannot listen on 127.0.0.1:{port}"
    )
    assert "Traceback" not in done.stderr
    done = run_cli(["console", "--port", "eighty"], env=env)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr


def test_under_pseudonyms_the_page_asks_by_id_and_the_topics_carry_the_pseudonym(
    settings: Settings, tmp_path: Path
) -> None:
    """With privacy.pseudonym_key set, a storefront click is published under the user's
    pseudonym, never the raw id, and a list the stream sends for that pseudonym reaches the
    browser that watches the raw id, shown under the id it asked for."""
    private = load_settings(
        data_dir=settings.data_dir,
        kafka=settings.kafka.model_dump(),
        privacy={"pseudonym_key": "k" * 32},
    )
    pseudonym = pseudonym_for("ada", b"k" * 32)
    server = start_console(private, port=0, worker_urls=[], eval_dir=tmp_path)
    try:
        assert server.console.recs.ready.wait(20)
        status, body = _post(
            server.url + "api/events", b'{"kind": "click", "user_id": "ada", "item_id": "i1"}'
        )
        assert status == 202
        assert body["user_id"] == "ada"
        sent = [json.loads(m.value()) for m in read_topic(settings, BEHAVIOR, timeout_s=3)]
        assert [e["user_id"] for e in sent] == [pseudonym]

        received: list[dict] = []
        reader = threading.Thread(
            target=_read_sse,
            args=(server.url + "api/users/ada/recommendations/stream", received),
            daemon=True,
        )
        reader.start()
        deadline = time.monotonic() + 10
        while pseudonym not in server.console.recs._watchers and time.monotonic() < deadline:
            time.sleep(0.05)
        rec = RecommendationEvent(
            user_id=pseudonym,
            trigger_event_id=body["event_id"],
            model_version="test-1",
            latency_ms=3.0,
            items=[RecommendedItem(item_id="i2", rank=1, score=0.5, reasons=["popular"])],
        )
        producer = Producer(producer_config(settings.kafka))
        producer.produce(RECOMMENDATIONS.name, key=pseudonym.encode(), value=rec.model_dump_json())
        assert producer.flush(10) == 0
        reader.join(20)
        assert [(r["user_id"], r["trigger_event_id"]) for r in received] == [
            ("ada", body["event_id"])
        ]
    finally:
        server.stop()
