"""The console's aiohttp application and the server that runs it on a thread of its own.

Pages: ``/`` (storefront), ``/ops`` (operations), ``/eval`` (evaluation); their scripts and
styles under ``/static/``. The JSON and server-sent-event endpoints they use:

- ``GET /api/catalogue``: the catalogue as the catalogue topic holds it;
- ``POST /api/events``: publish one behaviour event (view, click, add_to_cart, purchase,
  review) to the behaviour topic, exactly as any producer would; 202 with its event id;
- ``GET /api/users/{user_id}/recommendations/stream``: the user's lists as they arrive on the
  recommendation topic (SSE, ``event: recommendation``), starting with the latest known one, from
  this console's feed or else the workers' REST read path;
- ``GET /api/ops`` and ``GET /api/ops/stream`` (SSE, ``event: ops``, once a second): throughput,
  latency percentiles, lag, encoder rate and model versions from the workers' ``/metrics``, and
  dead letters by reason from the dead-letter topic; ``GET /api/dead-letters``: the kept letters
  with their whole original bytes;
- ``GET /api/eval``: every evaluation run under ``console.eval_dir``; ``/eval-files/...`` serves
  their plots and tables;
- ``GET /healthz``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from infra.cli import UserError
from infra.metrics import Scrape, parse
from infra.settings import Settings
from producers.producer import BehaviorProducer
from schemas.events import BEHAVIOR_TYPES
from schemas.serde import InvalidEvent
from streams.console.evals import FILES_PREFIX, find_runs, served_file
from streams.console.feeds import CatalogueFeed, DeadLetterFeed, RecommendationFeed, offer
from streams.console.ops import OpsHistory, totals

log = structlog.get_logger(__name__)

STATIC = Path(__file__).parent / "static"
PAGES = {"/": "store.html", "/ops": "ops.html", "/eval": "eval.html"}
#: Event kinds the storefront publishes.
KINDS = ("view", "click", "add_to_cart", "purchase", "review")
SCRAPE_TIMEOUT_S = 2.0
KEEPALIVE_S = 15.0
#: Dead letters sent with every operations update, and how much of each payload.
OPS_DEAD_LETTERS = 10
OPS_PAYLOAD_CHARS = 2000
MAX_BODY_BYTES = 64 * 1024


class BadRequest(ValueError):
    """A request the console refuses, with the one-line reason it answers."""


def _kind_supported() -> None:
    # The storefront's kinds must stay behaviour the stream accepts.
    unknown = [k for k in KINDS if k != "review" and k not in BEHAVIOR_TYPES]
    if unknown:  # pragma: no cover - a schema change would trip this at import
        raise RuntimeError(f"console kinds not in the behaviour schema: {unknown}")


_kind_supported()


def publish_event(producer: BehaviorProducer, body: Any) -> dict[str, Any]:
    """Publish the event a storefront request describes; :class:`BadRequest` says what is wrong."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    kind, user_id, item_id = body.get("kind"), body.get("user_id"), body.get("item_id")
    if kind not in KINDS:
        raise BadRequest(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    for name, value in (("user_id", user_id), ("item_id", item_id)):
        if not isinstance(value, str) or not value.strip():
            raise BadRequest(f"{name} must be a non-empty string")
    assert isinstance(user_id, str)
    assert isinstance(item_id, str)
    try:
        if kind == "review":
            text, rating = body.get("text"), body.get("rating")
            if not isinstance(text, str) or not text.strip():
                raise BadRequest("a review needs its text")
            if rating is not None and (
                isinstance(rating, bool) or not isinstance(rating, int | float)
            ):
                raise BadRequest("rating must be a number from 0 to 5")
            event = producer.review(user_id, item_id, text.strip(), rating)
        else:
            event = getattr(producer, kind)(user_id, item_id)
    except InvalidEvent as exc:  # the producer validates every event it builds
        raise BadRequest(" ".join(str(exc).split())) from exc
    return {
        "event_id": event.event_id,
        "ts": event.ts,
        "user_id": user_id,
        "item_id": item_id,
        "kind": kind,
    }


class Console:
    """The console's state (topic feeds, producer, scrape history) and its aiohttp app."""

    def __init__(
        self,
        settings: Settings,
        *,
        worker_urls: list[str] | None = None,
        eval_dir: Path | None = None,
        poll_s: float = 1.0,
    ) -> None:
        self.settings = settings
        self.worker_urls = (
            worker_urls
            if worker_urls is not None
            else settings.console.metrics_urls(settings.stream)
        )
        self.eval_dir = eval_dir if eval_dir is not None else settings.console.eval_dir
        self.poll_s = poll_s
        self.catalogue = CatalogueFeed(settings)
        self.recs = RecommendationFeed(settings, self.catalogue)
        self.dead_letters = DeadLetterFeed(settings)
        self.history = OpsHistory()
        self.workers: list[dict[str, Any]] = [
            {"url": url, "up": False, "error": "not read yet"} for url in self.worker_urls
        ]
        self._producer: BehaviorProducer | None = None
        self._session: aiohttp.ClientSession | None = None
        self._poller: asyncio.Task[None] | None = None
        self._ops_watchers: list[asyncio.Queue[dict[str, Any]]] = []
        self._streams: set[asyncio.Task[Any]] = set()  # open event streams, ended at shutdown

    # -- lifecycle -------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        for path, page in PAGES.items():
            app.router.add_get(path, self._page(page))
        app.router.add_static("/static/", STATIC)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/api/catalogue", self.get_catalogue)
        app.router.add_post("/api/events", self.post_event)
        app.router.add_get("/api/users/{user_id}/recommendations/stream", self.user_stream)
        app.router.add_get("/api/ops", self.get_ops)
        app.router.add_get("/api/ops/stream", self.ops_stream)
        app.router.add_get("/api/dead-letters", self.get_dead_letters)
        app.router.add_get("/api/eval", self.get_eval)
        app.router.add_get(FILES_PREFIX + "{path:.+}", self.eval_file)
        app.on_startup.append(self._start)
        app.on_shutdown.append(self._end_streams)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app: web.Application) -> None:
        self._producer = BehaviorProducer(self.settings, source="console", linger_ms=0)
        for feed in (self.catalogue, self.recs, self.dead_letters):
            feed.start()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S))
        self._poller = asyncio.create_task(self._poll())

    async def _end_streams(self, app: web.Application) -> None:
        """End every open event stream, so shutting down does not wait for browsers."""
        for task in list(self._streams):
            task.cancel()

    async def _stop(self, app: web.Application) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self._session is not None:
            await self._session.close()
        loop = asyncio.get_running_loop()
        for feed in (self.catalogue, self.recs, self.dead_letters):
            await loop.run_in_executor(None, feed.stop)
        if self._producer is not None:
            await loop.run_in_executor(None, self._producer.close)

    # -- pages and catalogue ---------------------------------------------------------------

    @staticmethod
    def _page(name: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def page(request: web.Request) -> web.StreamResponse:
            return web.FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})

        return page

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def get_catalogue(self, request: web.Request) -> web.Response:
        return web.json_response({"items": self.catalogue.items()})

    # -- publishing --------------------------------------------------------------------------

    async def post_event(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "the body is not JSON"}, status=400)
        producer = self._producer
        if producer is None:
            return web.json_response({"error": "the console is not started"}, status=503)
        try:
            sent = publish_event(producer, body)
        except BadRequest as exc:
            return web.json_response({"error": str(exc)}, status=400)
        loop = asyncio.get_running_loop()
        undelivered = await loop.run_in_executor(None, producer.flush, 10.0)
        if undelivered:
            return web.json_response({"error": "the broker did not take the event"}, status=503)
        log.info("console_event", kind=sent["kind"], item_id=sent["item_id"])
        return web.json_response(sent, status=202)

    # -- recommendations ---------------------------------------------------------------------

    async def user_stream(self, request: web.Request) -> web.StreamResponse:
        user_id = request.match_info["user_id"]
        response = await _open_sse(request, self._streams)
        queue, unwatch = self.recs.watch(user_id)

        def as_asked(body: dict[str, Any]) -> dict[str, Any]:
            # Under pseudonyms the topic carries the user's pseudonym; the page asked by id.
            return {**body, "user_id": user_id}

        try:
            first = self.recs.latest(user_id) or await self._rest_latest(user_id)
            if first is not None:
                await response.write(sse("recommendation", as_asked(first)))
            await _pump(response, queue, "recommendation", as_asked)
        finally:
            unwatch()
        return response

    async def _rest_latest(self, user_id: str) -> dict[str, Any] | None:
        """The user's latest list from the workers' REST read path, if any worker has one."""
        if self._session is None:
            return None
        published = self.recs.published_id(user_id)
        for url in self.worker_urls:
            try:
                async with self._session.get(f"{url}/users/{published}/recommendations") as r:
                    if r.status != 200:
                        continue
                    body = await r.json()
            except (aiohttp.ClientError, TimeoutError, ValueError):
                continue
            return self.recs.enrich(body, str(body.get("source", "latest")))
        return None

    # -- operations --------------------------------------------------------------------------

    async def _scrape(self, index: int, url: str) -> Scrape | None:
        assert self._session is not None
        try:
            async with self._session.get(f"{url}/metrics") as r:
                if r.status != 200:
                    raise aiohttp.ClientResponseError(
                        r.request_info, (), status=r.status, message=r.reason or ""
                    )
                scrape = parse(await r.text())
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self.workers[index] = {"url": url, "up": False, "error": str(exc) or type(exc).__name__}
            return None
        self.workers[index] = {"url": url, "up": True, "error": None}
        return scrape

    async def _poll(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self._poll_once()
            except Exception:  # one bad scrape must not stop the operations page for good
                log.exception("console_poll_failed")
            await asyncio.sleep(max(0.0, self.poll_s - (time.monotonic() - started)))

    async def _poll_once(self) -> None:
        scrapes = await asyncio.gather(
            *(self._scrape(n, url) for n, url in enumerate(self.worker_urls))
        )
        point = self.history.add(
            int(time.time() * 1000),
            totals(s for s in scrapes if s is not None),
            self.dead_letters.total,
        )
        update = self.ops_body([point.as_json()])
        for queue in list(self._ops_watchers):
            offer(queue, update)

    def ops_body(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        letters = self.dead_letters.summary()
        recent = []
        for letter in letters["recent"][:OPS_DEAD_LETTERS]:
            text = letter["payload_text"]
            shown = {k: v for k, v in letter.items() if k != "payload_b64"}
            shown["payload_text"] = text[:OPS_PAYLOAD_CHARS]
            shown["payload_truncated"] = len(text) > OPS_PAYLOAD_CHARS
            recent.append(shown)
        return {
            "now": int(time.time() * 1000),
            "history": history,
            "current": history[-1] if history else None,
            "dead_letters": {"by_reason": letters["by_reason"], "recent": recent},
            "models": [{"model": m, "version": v} for m, v in self.history.models],
            "workers": list(self.workers),
        }

    async def get_ops(self, request: web.Request) -> web.Response:
        return web.json_response(self.ops_body([p.as_json() for p in self.history.points]))

    async def ops_stream(self, request: web.Request) -> web.StreamResponse:
        response = await _open_sse(request, self._streams)
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(8)
        self._ops_watchers.append(queue)
        try:
            await _pump(response, queue, "ops", lambda body: body)
        finally:
            self._ops_watchers.remove(queue)
        return response

    async def get_dead_letters(self, request: web.Request) -> web.Response:
        return web.json_response(self.dead_letters.summary())

    # -- evaluation --------------------------------------------------------------------------

    async def get_eval(self, request: web.Request) -> web.Response:
        loop = asyncio.get_running_loop()
        runs = await loop.run_in_executor(None, find_runs, self.eval_dir)
        return web.json_response({"eval_dir": str(self.eval_dir), "runs": runs})

    async def eval_file(self, request: web.Request) -> web.StreamResponse:
        path = served_file(self.eval_dir, request.match_info["path"])
        if path is None:
            raise web.HTTPNotFound(text="no such evaluation file")
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})


async def _open_sse(request: web.Request, streams: set[asyncio.Task[Any]]) -> web.StreamResponse:
    task = asyncio.current_task()
    if task is not None:
        streams.add(task)
        task.add_done_callback(streams.discard)
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    await response.write(b"retry: 1000\n\n")
    return response


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (0 = any free port); :class:`UserError` if taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(
            f"the console cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from exc
    sock.listen(128)
    sock.setblocking(False)
    return sock


def sse(event: str, body: dict[str, Any]) -> bytes:
    """One server-sent event."""
    return f"event: {event}\ndata: {json.dumps(body, separators=(',', ':'))}\n\n".encode()


async def _pump(
    response: web.StreamResponse,
    queue: asyncio.Queue[dict[str, Any]],
    event: str,
    shape: Callable[[dict[str, Any]], dict[str, Any]],
) -> None:
    """Send what arrives on ``queue`` as server-sent events (a comment every
    :data:`KEEPALIVE_S` keeps proxies from closing a quiet stream) until the browser goes away
    or the console stops."""
    try:
        while True:
            try:
                body = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            await response.write(sse(event, shape(body)))
    except (ConnectionResetError, aiohttp.ClientConnectionResetError, asyncio.CancelledError):
        pass


class ConsoleServer:
    """Runs a :class:`Console` on its own thread and event loop, for the demo, the CLI and tests.

    ``start()`` returns once the console listens; ``url`` is its address. ``stop()`` closes the
    browsers' streams, the feeds and the producer.
    """

    def __init__(self, console: Console, host: str, port: int) -> None:
        self.console = console
        self._sock = bind(host, port)
        bound_host, bound_port = self._sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.url = f"http://{shown}:{bound_port}/"
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="console", daemon=True)

    def start(self, timeout_s: float = 30.0) -> str:
        self._thread.start()
        if not self._started.wait(timeout_s):
            raise TimeoutError(f"the console did not start within {timeout_s:.0f} s")
        if self._error is not None:
            raise self._error
        return self.url

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._runner = web.AppRunner(self.console.app(), shutdown_timeout=2.0)
            self._loop.run_until_complete(self._runner.setup())
            site = web.SockSite(self._runner, self._sock)
            self._loop.run_until_complete(site.start())
        except BaseException as exc:  # noqa: BLE001 - reported to start()'s caller
            self._error = exc
            self._started.set()
            return
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        left = asyncio.all_tasks(self._loop)
        for task in left:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()

    def stop(self, timeout_s: float = 20.0) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout_s)
        self._sock.close()
