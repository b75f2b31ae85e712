"""The web console in a real browser: headless Chromium (Debian's package) driven by Playwright,
against the embedded broker, a real worker with the real encoder, and a real console.

Screenshots of each page are saved under ``test-artifacts/console/`` (``RECSTREAM_ARTIFACTS``
moves it) for a person to look at after the run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clirun import run_cli
from conftest import Stack

from infra.broker import EmbeddedBroker, free_port
from infra.kafka import provision_topics
from infra.settings import Settings, load_settings
from producers.demo.data import catalog
from producers.producer import BehaviorProducer
from producers.replay import replay
from schemas.eventlog import rows_to_frame, to_row
from schemas.events import BehaviorEvent
from schemas.topics import BEHAVIOR, ENCODE_REQUESTS
from streams.console import start_console

pytestmark = [pytest.mark.stack, pytest.mark.browser]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("RECSTREAM_ARTIFACTS", "test-artifacts")) / "console"
SCIFI = "scifi-001"
SCIFI_TITLE = "The Salt Orbit"
T0 = 1_700_000_000_000

if CHROMIUM is None:
    reason = "no chromium on this machine: `make browser-tools` installs Debian's package"
    if os.environ.get("CI"):
        raise RuntimeError(reason)  # CI installs it; a skip there would hide the browser tests
    pytest.skip(reason, allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")


def _shot(page: Any, name: str, *, whole: bool = True) -> Path:
    """Save the page as ``ARTIFACTS/name.png``: the whole page (the viewport grown to it, so the
    sticky header stays on top) or only what the viewport shows."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    if whole:
        height = int(page.evaluate("document.documentElement.scrollHeight"))
        page.set_viewport_size({"width": 1400, "height": min(max(height, 600), 4000)})
        page.wait_for_timeout(300)  # charts redraw for the new size
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(path))
    assert path.stat().st_size > 10_000
    return path


def _eval_runs(root: Path) -> None:
    """Two real `recstream eval` runs of a small log, for the evaluation page."""
    rows = []
    sequences = {f"u{n}": [f"i{(n + k) % 12}" for k in range(5)] for n in range(30)}
    for user, items in sequences.items():
        for k, item in enumerate(items):
            event = BehaviorEvent(
                type="purchase",
                user_id=user,
                item_id=item,
                ts=T0 + 60_000 * k,
                event_id=f"{user}-{k}",
            )
            rows.append(to_row(event))
    log = root / "small.parquet"
    root.mkdir(parents=True, exist_ok=True)
    rows_to_frame(rows).write_parquet(log)
    for name, models in (("baselines", "mostpop,covisit"), ("popularity", "mostpop")):
        done = run_cli(
            ["eval", str(log), "--out", str(root / name), "--models", models], timeout=120
        )
        assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Broker, worker (with its web server, so /metrics can be read), the demo catalogue embedded
    by the real encoder, two evaluation runs, and a console on a free loopback port."""
    workdir = tmp_path_factory.mktemp("console")
    with EmbeddedBroker(log_file=workdir / "broker.log") as broker:
        settings = load_settings(
            data_dir=workdir / "data",
            kafka={"bootstrap_servers": broker.bootstrap_servers, "partitions": 1},
        )
        provision_topics(settings.kafka)
        web_port = free_port()
        stack = Stack(settings, workdir, RECSTREAM_STREAM__WEB_PORT=str(web_port))
        try:
            items = catalog()
            stack.publish(*items)
            stack.wait_committed(ENCODE_REQUESTS.name, len(items), timeout_s=300)
            _eval_runs(workdir / "eval")
            server = start_console(
                settings,
                port=0,
                worker_urls=[f"http://127.0.0.1:{web_port}"],
                eval_dir=workdir / "eval",
            )
            try:
                yield {
                    "settings": settings,
                    "stack": stack,
                    "url": server.url,
                    "dir": workdir,
                    "console": server,
                }
            finally:
                server.stop()
        finally:
            stack.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium from Debian's package; Playwright downloads no browser."""
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh page that records the page's script errors; the test fails on any."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    opened.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    try:
        yield opened
    finally:
        context.close()
    assert errors == [], f"the page reported errors: {errors}"


def test_three_scifi_clicks_update_the_list_with_scifi_items_and_reasons(
    live: dict[str, Any], page: Any
) -> None:
    """On the storefront, clicking one sci-fi item three times publishes three click events; the
    list beside it updates live with sci-fi items, each with a reason, one of them naming the
    clicked book, and the time from click to updated list is shown."""
    page.goto(live["url"] + "?user=browser-shopper")
    card = page.locator(f'[data-testid="item"][data-item-id="{SCIFI}"]')
    card.wait_for(timeout=30_000)
    assert page.locator('[data-testid="recs"] [data-testid="rec"]').count() == 0
    for _ in range(3):
        card.locator('[data-action="click"]').first.click()
        page.wait_for_timeout(250)
    sent = page.locator('[data-testid="sent"] li')
    sync_api.expect(sent).to_have_count(3, timeout=10_000)
    page.wait_for_selector('[data-testid="click-to-list"][data-ms]', timeout=60_000)
    page.wait_for_function(
        "document.querySelectorAll('[data-testid=recs] [data-testid=rec]').length >= 5",
        timeout=30_000,
    )
    recs = page.eval_on_selector_all(
        '[data-testid="recs"] [data-testid="rec"]',
        """els => els.map(e => ({
            id: e.dataset.itemId,
            reasons: [...e.querySelectorAll('[data-testid=reason]')].map(r => r.textContent.trim())
        }))""",
    )
    top = recs[:5]
    assert sum(r["id"].startswith("scifi-") for r in top) >= 4, recs
    assert all(r["reasons"] and all(r["reasons"]) for r in recs), recs
    assert any(SCIFI_TITLE in reason for r in top for reason in r["reasons"]), recs
    click_to_list = int(page.get_attribute('[data-testid="click-to-list"]', "data-ms") or "-1")
    assert 0 < click_to_list < 60_000
    assert re.search(r"\d+ ms", page.inner_text('[data-testid="click-to-list"]'))
    _shot(page, "store", whole=False)


def test_a_console_started_later_gets_the_first_list_from_the_workers_rest_path(
    live: dict[str, Any],
) -> None:
    """A console that was not running when a user's list was sent answers that user's stream at
    once with the list the owning worker keeps (GET /users/{id}/recommendations), titles added."""
    settings: Settings = live["settings"]
    with BehaviorProducer(settings, source="test") as producer:
        event = producer.click("late-reader", SCIFI)
    stack: Stack = live["stack"]
    stack.wait_for(
        lambda body: body.get("trigger_event_id") == event.event_id, "the list for the click"
    )
    worker = live["console"].console.worker_urls
    later = start_console(settings, port=0, worker_urls=worker, eval_dir=live["dir"])
    try:
        deadline = time.monotonic() + 20  # its catalogue reader starts from the beginning
        while len(later.console.catalogue.items()) < len(catalog()):
            assert time.monotonic() < deadline, "the later console never read the catalogue"
            time.sleep(0.1)
        url = later.url + "api/users/late-reader/recommendations/stream"
        with urllib.request.urlopen(url, timeout=30) as stream:
            data = next(line for line in stream if line.startswith(b"data: "))
        first = json.loads(data[6:])
        assert first["source"] == "latest"
        assert first["trigger_event_id"] == event.event_id
        assert first["items"][0]["title"] != first["items"][0]["item_id"]
    finally:
        later.stop()


def _small_log(path: Path, users: int = 40, per_user: int = 10) -> Path:
    """Sci-fi and coffee browsing by ``users`` users, as a Parquet event log to replay."""
    rows = []
    for n in range(users):
        prefix = "scifi" if n % 2 else "coffee"
        for k in range(per_user):
            event = BehaviorEvent(
                type="view",
                user_id=f"replay-{n}",
                item_id=f"{prefix}-{(n + k) % 24 + 1:03d}",
                ts=T0 + 1000 * (n * per_user + k),
                event_id=f"replay-{n}-{k}",
            )
            rows.append(to_row(event))
    rows_to_frame(rows).write_parquet(path)
    return path


def test_operations_page_shows_throughput_after_a_replay_and_dead_letter_payloads(
    live: dict[str, Any], page: Any
) -> None:
    """After replaying an event log through the embedded broker, the operations page shows
    non-zero throughput, lists per second, latency percentiles and the served model; a malformed
    input shows up under its dead-letter reason with its original bytes viewable."""
    settings: Settings = live["settings"]
    stack: Stack = live["stack"]
    malformed = b'{"type": "click", "user_id": "x", "item_id": 7 , "oops"'
    stack.publish_raw(BEHAVIOR.name, "x", malformed)
    report = replay(settings, _small_log(live["dir"] / "replay.parquet"), None, progress=False)
    assert report.sent == 400
    page.goto(live["url"] + "ops")
    page.wait_for_function(
        "Number(document.querySelector('[data-testid=throughput]')?.dataset.value) > 0",
        timeout=30_000,
    )
    page.wait_for_function(
        "Number(document.querySelector('[data-testid=rec-rate]')?.dataset.value) > 0",
        timeout=30_000,
    )
    assert float(page.get_attribute('[data-testid="latency-p50"]', "data-value") or "nan") > 0
    assert page.inner_text('[data-testid="model-version"]').strip() not in ("", "–")
    assert "up" in page.inner_text('[data-testid="workers"]')
    row = page.locator('[data-testid="dead-letter-reason"]').first
    row.wait_for(timeout=30_000)
    assert "validate-input" in row.inner_text()
    letter = page.locator('[data-testid="dead-letter"]').first
    letter.locator('[data-action="show-payload"]').click()
    payload = letter.locator('[data-testid="payload"]')
    sync_api.expect(payload).to_be_visible()
    assert payload.inner_text() == malformed.decode()
    for chart in ("chart-throughput", "chart-latency", "chart-lag", "chart-encoder"):
        assert page.locator(
            f'[data-testid="{chart}"] polyline, [data-testid="{chart}"] path'
        ).count()
    _shot(page, "ops")


def test_evaluation_page_renders_the_latest_runs_table_and_plots(
    live: dict[str, Any], page: Any
) -> None:
    """The evaluation page shows the newest `recstream eval` run's models with their figures
    from results.json, loads its plots, and compares every run's models in one table."""
    page.goto(live["url"] + "eval")
    table = page.locator('[data-testid="eval-table"]')
    table.wait_for(timeout=20_000)
    assert page.locator('[data-testid="eval-table"] tr[data-model="mostpop"]').count() == 1
    assert page.locator('[data-testid="eval-table"] tr[data-model="covisit"]').count() == 0
    assert "popularity" in page.locator('[data-testid="eval-run"]').input_value()
    plots = page.locator('img[data-testid="eval-plot"]')
    sync_api.expect(plots).to_have_count(2)
    page.wait_for_function(
        "[...document.querySelectorAll('img[data-testid=eval-plot]')]"
        ".every(i => i.complete && i.naturalWidth > 100)",
        timeout=10_000,
    )
    compare = page.locator('[data-testid="eval-compare"]').inner_text()
    assert compare.count("mostpop") == 2
    assert "covisit" in compare
    page.select_option('[data-testid="eval-run"]', index=1)
    sync_api.expect(table.locator('tr[data-model="covisit"]')).to_have_count(1)
    _shot(page, "eval")


def test_demo_prints_the_console_address_on_loopback_and_serves_it(tmp_path: Path) -> None:
    """`recstream demo` starts the console on loopback and says where in its output; the
    storefront there lists the demo catalogue while the demo runs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSTREAM_")}
    env["RECSTREAM_DEVICE"] = "cpu"
    demo = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "infra.cli",
            "demo",
            "--duration",
            "20",
            "--console-port",
            "0",
            "--data-dir",
            str(tmp_path / "demo"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        assert demo.stdout is not None
        address = None
        deadline = time.monotonic() + 300
        seen = []
        while address is None and time.monotonic() < deadline:
            line = demo.stdout.readline()
            if not line:
                break
            seen.append(line)
            found = re.search(r"console: (http://127\.0\.0\.1:\d+/)", line)
            address = found.group(1) if found else None
        assert address is not None, "".join(seen)
        with urllib.request.urlopen(address + "api/catalogue", timeout=10) as r:
            items = json.loads(r.read())["items"]
        deadline = time.monotonic() + 30
        while len(items) < len(catalog()) and time.monotonic() < deadline:
            time.sleep(0.5)
            with urllib.request.urlopen(address + "api/catalogue", timeout=10) as r:
                items = json.loads(r.read())["items"]
        assert len(items) == len(catalog())
        out, _ = demo.communicate(timeout=400)
        assert demo.returncode == 0, "".join(seen) + out
    finally:
        if demo.poll() is None:
            demo.kill()
