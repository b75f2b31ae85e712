"""The worker's web server: Prometheus metrics, health, and the REST read path routed between
two workers (tested against the embedded broker, Qdrant Edge and the real encoder)."""

from __future__ import annotations

import json
import math
import shutil
import time
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from consumers.consumer import read_topic
from infra.broker import EmbeddedBroker, free_port
from infra.kafka import group_progress, producer_config, provision_topics
from infra.metrics import Registry, parse, render
from infra.settings import Settings, load_settings
from schemas.topics import BEHAVIOR, CATALOG, ENCODE_REQUESTS, RECOMMENDATIONS, USER_UPDATES
from streams.observe import EVENTS, LAG, LATENCY, MODEL_INFO, serving
from streams.observe import RECOMMENDATIONS as LISTS
from streams.services import Services
from streams.sinks import Output, Sinks, user_update_key
from streams.spawn import spawn_worker, stop_process
from streams.topology import build_topology
from streams.web import openapi
from tests.conftest import catalogue

TS = 1_700_000_000_000

# -- the exposition format, without a worker --------------------------------------------------


def test_render_writes_counters_gauges_and_cumulative_histograms() -> None:
    """render() types each metric once, escapes label values, and writes a histogram as
    cumulative buckets ending at +Inf with its sum and count."""
    registry = Registry()
    registry.counter("recstream_x_total", reason='say "hi"\n').inc(3)
    registry.gauge("recstream_g").set(2.5)
    hist = registry.histogram("recstream_lat_seconds", (0.01, 0.1, 1.0), op="q")
    for value in (0.005, 0.01, 0.05, 2.0):
        hist.observe(value)
    text = render(registry)
    assert text.count("# TYPE recstream_lat_seconds histogram") == 1
    assert 'recstream_x_total{reason="say \\"hi\\"\\n"} 3' in text
    assert "recstream_g 2.5" in text
    lines = [line for line in text.splitlines() if line.startswith("recstream_lat_seconds")]
    assert lines == [
        'recstream_lat_seconds_bucket{op="q",le="0.01"} 2',
        'recstream_lat_seconds_bucket{op="q",le="0.1"} 3',
        'recstream_lat_seconds_bucket{op="q",le="1"} 3',
        'recstream_lat_seconds_bucket{op="q",le="+Inf"} 4',
        'recstream_lat_seconds_sum{op="q"} 2.065',
        'recstream_lat_seconds_count{op="q"} 4',
    ]


def test_a_metric_keeps_its_kind_and_the_served_model_is_the_only_one_at_one() -> None:
    """A name registered as a counter cannot come back as a histogram; switching the served
    model sets the old model's info gauge to 0 and the new one's to 1."""
    registry = Registry()
    registry.counter("recstream_c_total").inc()
    with pytest.raises(ValueError, match="is a counter"):
        registry.histogram("recstream_c_total")
    serving("untrained", "untrained+enc", registry)
    serving("trained-1", "trained-1+enc", registry)
    info = {s.labels: s.value for s in registry.snapshot() if s.name == MODEL_INFO}
    assert info == {
        (("model", "untrained"), ("version", "untrained+enc")): 0.0,
        (("model", "trained-1"), ("version", "trained-1+enc")): 1.0,
    }


def test_openapi_document_lists_the_read_path_only_where_it_is_served() -> None:
    """The OpenAPI document of a recommend worker has the user and similar-item paths with their
    parameters; an ingest worker's has only health, readiness and metrics."""
    full = openapi(user_routes=True)
    assert full["openapi"] == "3.1.0"
    assert set(full["paths"]) == {
        "/healthz",
        "/readyz",
        "/metrics",
        "/users/{user_id}/recommendations",
        "/items/{item_id}/similar",
    }
    similar = full["paths"]["/items/{item_id}/similar"]["get"]
    assert [p["name"] for p in similar["parameters"]] == ["item_id", "k"]
    assert set(openapi(user_routes=False)["paths"]) == {"/healthz", "/readyz", "/metrics"}


def test_user_updates_are_keyed_as_the_user_state_table_keys_its_changelog(tmp_path: Path) -> None:
    """The key a user's updates carry is, byte for byte, the key the worker's user-state table
    writes to its changelog, so both hash to the same partition (and Faust routes a REST
    request for the user to the worker holding that partition)."""
    settings = load_settings(data_dir=tmp_path)
    services = Services(settings)
    try:
        users = build_topology(settings, "recommend", services).tables
        assert users is not None
        sent: list[dict[str, Any]] = []

        class Topic:
            def send_soon(self, **message: Any) -> None:
                sent.append(message)

        sinks = Sinks({USER_UPDATES.name: Topic()})
        for user_id in ("u1", "ü-42", 'quote"d'):
            changelog_key = users.users.table.changelog_topic.prepare_key(user_id, None)[0]
            assert user_update_key(user_id) == changelog_key
            sinks.send(Output(USER_UPDATES, user_id, b"{}"))
            assert sent[-1]["key"] == changelog_key
    finally:
        services.close()


# -- two recommend workers behind the REST read path -------------------------------------------


def _get(url: str) -> tuple[int, Any]:
    """GET ``url``: (status, parsed JSON body, or the text for non-JSON)."""
    try:
        with urllib.request.urlopen(url, timeout=20) as response:
            body = response.read().decode()
            status = response.status
            kind = response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        body, status, kind = exc.read().decode(), exc.code, exc.headers.get("Content-Type", "")
    return status, json.loads(body) if "json" in kind else body


def _wait_ready(procs: dict[str, Any], urls: list[str], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(urls)
    while pending:
        for name, (proc, log) in procs.items():
            assert proc.poll() is None, f"{name} exited:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"not ready: {pending}"
        try:
            if _get(pending[0] + "/readyz")[0] == 200:
                pending.pop(0)
                continue
        except OSError:
            pass
        time.sleep(0.5)


def _publish(settings: Settings, topic: str, events: list[dict[str, Any]], key: str) -> None:
    producer = Producer(producer_config(settings.kafka))
    for event in events:
        producer.produce(topic, key=event[key].encode(), value=json.dumps(event).encode())
    assert producer.flush(30) == 0


def _wait_committed(settings: Settings, group: str, topic: str, count: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if group_progress(settings.kafka, group, topic)[0] >= count:
                return
        except Exception:  # noqa: BLE001 - the group may not exist yet; keep polling
            pass
        time.sleep(0.5)
    raise AssertionError(f"{group} did not commit {count} messages of {topic}")


def _scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, text = _get(url + "/metrics")
    assert status == 200
    return parse(text)


def _owned(url: str) -> set[int]:
    """The user-update partitions a worker has assigned (its lag gauges name them)."""
    return {
        int(dict(labels)["partition"])
        for (name, labels) in _scrape(url)
        if name == LAG and ("topic", USER_UPDATES.name) in labels
    }


def _total(scrapes: list[dict], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for s in scrapes for (n, lab), v in s.items() if n == name and want <= lab)


@pytest.mark.stack
def test_two_workers_route_each_user_to_its_owner_and_serve_metrics(tmp_path: Path) -> None:
    """With the user-state partitions split between two recommend workers, GET
    /users/{id}/recommendations on either worker answers every user with that user's latest
    list from the recommendation topic (a request for the other worker's user is forwarded to
    it); similar items come from the vector store; each worker's /metrics counts exactly the
    events it took in, and the two together count every event and every list sent."""
    with EmbeddedBroker(log_file=tmp_path / "broker.log") as broker:
        base = load_settings(
            data_dir=tmp_path / "seed",
            kafka={"bootstrap_servers": broker.bootstrap_servers, "partitions": 4},
        )
        provision_topics(base.kafka)
        cpu = {"RECSTREAM_DEVICE": "cpu"}
        # 1. The catalogue through the real pipeline (one worker), then a copy of its vectors
        # for the second recommend worker: Qdrant Edge is single-process.
        seed_log = tmp_path / "seed.log"
        seed = spawn_worker(base, seed_log, "all", RECSTREAM_STREAM__WEB_PORT="0", **cpu)
        items = catalogue(24)
        try:
            _publish(base, CATALOG.name, items, "item_id")
            _wait_committed(base, "recstream", ENCODE_REQUESTS.name, len(items))
        finally:
            assert stop_process(seed) == 0, seed_log.read_text()[-4000:]
        dirs = [tmp_path / "w1", tmp_path / "w2"]
        for d in dirs:
            shutil.copytree(base.vectors_dir, d / base.vectors_dir.relative_to(base.data_dir))
        # 2. An ingest worker and two recommend workers, each with its web server.
        ports = [free_port(), free_port()]
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        procs: dict[str, Any] = {}
        try:
            for n, (d, port) in enumerate(zip(dirs, ports, strict=True)):
                log = tmp_path / f"recommend{n}.log"
                env = {"RECSTREAM_STREAM__WEB_PORT": str(port), "RECSTREAM_DATA_DIR": str(d)}
                procs[f"recommend{n}"] = (spawn_worker(base, log, "recommend", **env, **cpu), log)
            _wait_ready(procs, urls)
            # Both members in the group before any event, so no rebalance redelivers one.
            deadline = time.monotonic() + 90
            while True:
                owned = [_owned(u) for u in urls]
                if all(owned) and not owned[0] & owned[1]:
                    break
                assert time.monotonic() < deadline, f"partitions not split: {owned}"
                time.sleep(1)
            log = tmp_path / "ingest.log"
            ingest_env = {"RECSTREAM_STREAM__WEB_PORT": "0", **cpu}
            procs["ingest"] = (spawn_worker(base, log, "ingest", **ingest_env), log)

            users = [f"u{n}" for n in range(16)]
            events = [
                {
                    "type": ("view", "click", "purchase")[n % 3],
                    "event_id": f"e{n}",
                    "ts": TS + 1000 * n,
                    "user_id": users[n % len(users)],
                    "item_id": f"i{(n * 5) % len(items)}",
                }
                for n in range(96)
            ]
            # The seed run's encoder left item notices on the user-update topic; they count too.
            notices = sum(1 for _ in read_topic(base, USER_UPDATES, timeout_s=2.0))
            updates = notices + len(events)
            _publish(base, BEHAVIOR.name, events, "user_id")
            _wait_committed(base, "recstream-ingest", BEHAVIOR.name, len(events))
            # Every message on the user-update topic by now: the seed run's item notices and
            # the ingest hop's updates (several to a message).
            messages = group_progress(base.kafka, "recstream-recommend", USER_UPDATES.name)[1]
            _wait_committed(base, "recstream-recommend", USER_UPDATES.name, messages)

            latest: dict[str, dict] = {}
            per_user: dict[str, int] = defaultdict(int)
            deadline = time.monotonic() + 60
            while len(latest) < len(users):
                assert time.monotonic() < deadline, f"lists for {sorted(latest)} only"
                latest.clear()
                per_user.clear()
                for msg in read_topic(base, RECOMMENDATIONS, timeout_s=2.0):
                    body = json.loads(msg.value() or b"{}")
                    latest[body["user_id"]] = body  # one partition per user: in order
                    per_user[body["user_id"]] += 1

            for user in users:
                answers = [_get(f"{u}/users/{user}/recommendations") for u in urls]
                for status, body in answers:
                    assert status == 200, body
                    assert body["source"] == "latest"
                    assert body["user_id"] == user
                    assert body["trigger_event_id"] == latest[user]["trigger_event_id"]
                    assert body["items"] == latest[user]["items"]
            status, body = _get(f"{urls[0]}/users/nobody/recommendations")
            assert status == 404

            status, body = _get(f"{urls[1]}/items/i0/similar?k=5")
            assert status == 200
            found = [s["item_id"] for s in body["similar"]]
            assert len(found) == 5
            assert "i0" not in found
            assert body["similar"][0]["score"] >= body["similar"][-1]["score"]
            assert all("telescopes" in s["title"] for s in body["similar"][:3])  # same kind
            assert _get(f"{urls[0]}/items/nope/similar")[0] == 404
            assert _get(f"{urls[0]}/items/i0/similar?k=abc")[0] == 400
            assert _get(f"{urls[0]}/healthz") == (200, {"status": "ok"})

            scrapes = [_scrape(u) for u in urls]
            took = [_total([s], EVENTS, agent="update-user-state") for s in scrapes]
            assert all(n > 0 for n in took), took  # both workers took user updates
            assert sum(took) == updates
            lists = sum(per_user.values())
            assert _total(scrapes, LISTS) == lists
            assert _total(scrapes, LATENCY + "_count") == lists
            assert math.isclose(_total(scrapes, LATENCY + "_bucket", le="+Inf"), lists)
            assert _total(scrapes, MODEL_INFO) == 2  # one served model per worker
        finally:
            for proc, _ in procs.values():
                stop_process(proc)
