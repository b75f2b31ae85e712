"""The worker's web server: health, readiness, Prometheus metrics and the REST read path.

Every worker whose ``stream.web_port`` is not 0 serves, on ``stream.web_host`` (loopback by
default):

- ``GET /healthz``: 200 while the worker runs (503 once it has crashed);
- ``GET /readyz``: 200 once its partitions are assigned and its tables recovered, 503 during a
  rebalance or recovery (a load balancer sends nothing to it then);
- ``GET /metrics``: every figure of :mod:`streams.observe` in Prometheus' text format;
- ``GET /openapi.json``: the OpenAPI document of these endpoints.

A worker with the user-state step (role ``all`` or ``recommend``) also serves:

- ``GET /users/{user_id}/recommendations``: the latest list sent for the user. The request is
  forwarded to the worker that owns the user's partition (Faust's table routing), which answers
  from the lists it keeps (``serving.latest_lists``) or, for a user it no longer keeps, ranks a
  list from the user's state now (``"source": "computed"``). 404 for a user with no state.
- ``GET /items/{item_id}/similar?k=10``: the available items nearest to the item's vector.
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import Executor
from typing import Any, cast

import faust
from faust.types import CollectionT
from faust.web import Request, Response, View

from infra.metrics import render
from infra.vectors import VectorStore
from infra.vectors.base import Filter
from streams.store import WriteBehind
from streams.user_state import UserStateStep

PROMETHEUS_TEXT = "text/plain; version=0.0.4"  # aiohttp adds the charset
MAX_SIMILAR = 100


def openapi(user_routes: bool) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the endpoints this worker serves."""

    def answer(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"description": description}
        if schema is not None:
            out["content"] = {"application/json": {"schema": schema}}
        return out

    status = {"type": "object", "properties": {"status": {"type": "string"}}}
    error = {"type": "object", "properties": {"error": {"type": "string"}}}
    paths: dict[str, Any] = {
        "/healthz": {
            "get": {
                "summary": "Liveness: the worker process runs",
                "responses": {"200": answer("running", status), "503": answer("crashed", status)},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: partitions assigned and tables recovered",
                "responses": {
                    "200": answer("ready", status),
                    "503": answer("rebalancing or recovering", status),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (text exposition format 0.0.4)",
                "responses": {
                    "200": {
                        "description": "metrics",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    }
    if user_routes:
        item = {
            "type": "object",
            "required": ["item_id", "rank", "score", "reasons"],
            "properties": {
                "item_id": {"type": "string"},
                "rank": {"type": "integer", "minimum": 1},
                "score": {"type": "number"},
                "reasons": {"type": "array", "items": {"type": "object"}},
            },
        }
        recommendation = {
            "type": "object",
            "required": ["user_id", "trigger_event_id", "model_version", "items", "source"],
            "properties": {
                "type": {"const": "recommendation"},
                "user_id": {"type": "string"},
                "trigger_event_id": {"type": "string"},
                "model_version": {"type": "string"},
                "latency_ms": {"type": "number"},
                "items": {"type": "array", "items": item},
                "source": {"enum": ["latest", "computed"]},
            },
        }
        similar = {
            "type": "object",
            "required": ["item_id", "similar"],
            "properties": {
                "item_id": {"type": "string"},
                "similar": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "item_id": {"type": "string"},
                            "score": {"type": "number"},
                            "title": {"type": "string"},
                            "categories": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                },
            },
        }
        path_param = {"in": "path", "required": True, "schema": {"type": "string"}}
        paths["/users/{user_id}/recommendations"] = {
            "get": {
                "summary": "The latest recommendation list for a user",
                "parameters": [{"name": "user_id", **path_param}],
                "responses": {
                    "200": answer("the list", recommendation),
                    "404": answer("no state for this user", error),
                    "503": answer("the user's partition has no owner yet", error),
                },
            }
        }
        paths["/items/{item_id}/similar"] = {
            "get": {
                "summary": "Available items nearest to an item's text vector",
                "parameters": [
                    {"name": "item_id", **path_param},
                    {
                        "name": "k",
                        "in": "query",
                        "required": False,
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": MAX_SIMILAR,
                            "default": 10,
                        },
                    },
                ],
                "responses": {
                    "200": answer("nearest items, best first", similar),
                    "400": answer("k is not an integer from 1 to 100", error),
                    "404": answer("no such item in the vector store", error),
                },
            }
        }
    return {
        "openapi": "3.1.0",
        "info": {"title": "recstream worker", "version": "1"},
        "paths": paths,
    }


def similar_items(
    store: VectorStore, collection: str, item_id: str, k: int
) -> list[dict[str, Any]] | None:
    """The ``k`` available items nearest to ``item_id`` (itself left out); None if it is not
    stored or has no vector."""
    point = store.retrieve(collection, [item_id]).get(item_id)
    if point is None or point.vector is None:
        return None
    hits = store.query_batch(
        collection,
        [point.vector],
        k,
        Filter(must_equal={"available": True}, exclude_keys=[item_id]),
    )[0]
    return [
        {
            "item_id": hit.key,
            "score": round(float(hit.score), 6),
            "title": str(hit.payload.get("title") or ""),
            "categories": list(hit.payload.get("categories") or []),
        }
        for hit in hits
    ]


def register_health(app: faust.App, *, user_routes: bool) -> None:
    """``/healthz``, ``/readyz``, ``/metrics`` and ``/openapi.json`` on ``app``."""
    spec = openapi(user_routes)

    @app.page("/healthz")
    async def healthz(view: View, request: Request) -> Response:
        if app._crashed.is_set():
            return view.json({"status": "crashed"}, status=503)
        return view.json({"status": "ok"})

    @app.page("/readyz")
    async def readyz(view: View, request: Request) -> Response:
        recovered = app.tables.recovery.completed.is_set()  # type: ignore[attr-defined]
        if app.rebalancing or not recovered:
            state = "rebalancing" if app.rebalancing else "recovering"
            return view.json({"status": state}, status=503)
        return view.json({"status": "ready"})

    @app.page("/metrics")
    async def metrics(view: View, request: Request) -> Response:
        return view.text(render(), content_type=PROMETHEUS_TEXT)

    @app.page("/openapi.json")
    async def openapi_json(view: View, request: Request) -> Response:
        return view.json(spec)


def register_reads(
    app: faust.App,
    *,
    step: UserStateStep,
    store: VectorStore,
    items_collection: str,
    executor: Executor,
) -> None:
    """The REST read path: a user's latest list (routed to its owner) and similar items."""
    users = cast(CollectionT, cast(WriteBehind, step.tables.users).table)  # the Faust table

    @app.page("/users/{user_id}/recommendations")
    @app.table_route(table=users, match_info="user_id")
    async def user_recommendations(view: View, request: Request, user_id: str) -> Response:
        kept = step.latest(user_id)
        if kept is not None:
            return view.json({**json.loads(kept), "source": "latest"})
        loop = asyncio.get_running_loop()
        event = await loop.run_in_executor(executor, step.fresh_list, user_id)
        if event is None:
            return view.json({"error": f"no recommendations for user {user_id!r}"}, status=404)
        return view.json({**event.model_dump(mode="json"), "source": "computed"})

    @app.page("/items/{item_id}/similar")
    async def item_similar(view: View, request: Request, item_id: str) -> Response:
        raw = request.query.get("k", "10")
        try:
            k = int(raw)
        except ValueError:
            k = 0
        if not 1 <= k <= MAX_SIMILAR:
            error = f"k must be an integer from 1 to {MAX_SIMILAR}, not {raw!r}"
            return view.json({"error": error}, status=400)
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(
            executor, similar_items, store, items_collection, item_id, k
        )
        if found is None:
            return view.json({"error": f"no item {item_id!r} in the vector store"}, status=404)
        return view.json({"item_id": item_id, "similar": found})
