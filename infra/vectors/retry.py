"""A vector store that waits out an unreachable backend instead of losing the batch in hand.

:class:`RetryingStore` wraps any :class:`~infra.vectors.base.VectorStore` and retries a call that
failed for a *transient* reason (:func:`is_transient`: connection refused or reset, timeouts,
HTTP 429 and 5xx, gRPC UNAVAILABLE) with exponential backoff and jitter: about 0.05 s, doubling
up to ``max_wait_s`` (5 s by default) between attempts, forever unless ``deadline_s`` is set.
Any other error (a 400, a wrong dimension, a ValueError) is raised at once: waiting cannot fix it.

Why retrying forever loses nothing and grows nothing: every store operation is idempotent
(points are keyed, deletes ignore unknown keys), so repeating one that may have half-succeeded is
safe. While a call waits, the agent that made it does not take its next batch; Faust keeps at
most ``stream.buffer_maxsize`` messages per partition in memory and then pauses fetching, and
offsets past the waiting batch are not committed. The backlog stays in Kafka until the store is
back. With ``deadline_s``, a call that still fails that many seconds after its first failure
raises :class:`VectorStoreUnavailable`, an infrastructure error the agents let through. Faust's
``take_events`` acks a batch even when the agent raises, so a give-up drops the batch in hand
(the agent is restarted): a deadline trades that batch for not waiting, hence none by default.

The interface is synchronous, so a waiting call sleeps in the thread that made it: the ranking
thread for the recommend step's reads, the encoder's thread for the encode step, but the event
loop for the user-state step's ``forget`` (see docs/security.md, "Which thread waits").

Each retry logs one ``vector_store_unavailable`` warning (operation, attempt, wait, error); the
first success after failures logs ``vector_store_recovered`` (attempts, seconds down). Counters:
``recstream_vector_store_retries_total``, ``..._recoveries_total`` and ``..._give_ups_total``,
each labelled with the operation ``op`` (:mod:`infra.metrics`); the histogram
``recstream_vector_store_seconds`` times each successful call, its retries included.
"""

from __future__ import annotations

import random
import ssl
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
import structlog

from infra.metrics import REGISTRY, Registry
from infra.vectors.base import Filter, Hit, VectorPoint, VectorStore

log = structlog.get_logger(__name__)

T = TypeVar("T")

RETRIES = "recstream_vector_store_retries_total"
RECOVERIES = "recstream_vector_store_recoveries_total"
GIVE_UPS = "recstream_vector_store_give_ups_total"
SECONDS = "recstream_vector_store_seconds"

FIRST_WAIT_S = 0.05
MAX_WAIT_S = 5.0

#: OSErrors that waiting does not cure (a missing or unreadable path of an embedded store).
_LASTING_OS_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)
#: TLS failures that are a dropped connection rather than a refused certificate or protocol.
_DROPPED_TLS = (ssl.SSLEOFError, ssl.SSLZeroReturnError)
_GRPC_TRANSIENT = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")


class VectorStoreUnavailable(RuntimeError):
    """The vector store stayed unreachable past the retry deadline."""


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps: ``__cause__``/``__context__`` and qdrant-client's ``source``."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        item = todo.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        source = getattr(item, "source", None)
        todo += [item.__cause__, item.__context__]
        if isinstance(source, BaseException):
            todo.append(source)


def _refused_tls(exc: BaseException) -> bool:
    """A certificate or TLS-protocol failure anywhere in the chain: a setup error, not an outage."""
    return any(isinstance(e, ssl.SSLError) and not isinstance(e, _DROPPED_TLS) for e in _chain(exc))


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` may go away by waiting: the backend is down, overloaded or slow.

    Transient: ``OSError`` (``ConnectionError``, ``TimeoutError``) except missing or forbidden
    paths; httpx transport errors and timeouts; qdrant-client's ``ResponseHandlingException``
    (how it wraps those) unless it wraps a response it could not parse; an
    ``UnexpectedResponse`` with status 429 or 5xx; ``ResourceExhaustedResponse``; a gRPC error
    UNAVAILABLE, DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED. A refused TLS certificate is not.
    """
    if _refused_tls(exc):
        return False
    verdict = _client_verdict(exc)
    if verdict is not None:
        return verdict
    return isinstance(exc, OSError) and not isinstance(exc, _LASTING_OS_ERRORS)


def _client_verdict(exc: BaseException) -> bool | None:
    """The verdict on an error of qdrant-client, httpx or gRPC; None for any other error.

    The modules are looked up, not imported: an error of a library nobody imported cannot occur.
    """
    qdrant_http = sys.modules.get("qdrant_client.http.exceptions")
    if qdrant_http is not None and isinstance(exc, qdrant_http.UnexpectedResponse):
        status = exc.status_code
        return status is None or status == 429 or status >= 500
    if qdrant_http is not None and isinstance(exc, qdrant_http.ResponseHandlingException):
        pydantic = sys.modules.get("pydantic")
        unparsable = pydantic is not None and isinstance(exc.source, pydantic.ValidationError)
        return not unparsable
    qdrant_common = sys.modules.get("qdrant_client.common.client_exceptions")
    if qdrant_common is not None and isinstance(exc, qdrant_common.ResourceExhaustedResponse):
        return True
    httpx = sys.modules.get("httpx")
    if httpx is not None and isinstance(exc, httpx.TransportError):
        return not isinstance(exc, httpx.UnsupportedProtocol)
    grpc = sys.modules.get("grpc")
    if grpc is not None and isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
        return getattr(exc.code(), "name", "") in _GRPC_TRANSIENT
    return None


def describe(exc: BaseException, limit: int = 300) -> str:
    """``exc`` as one short line: its type and its message with whitespace collapsed."""
    text = " ".join(str(exc).split())
    line = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


class RetryingStore:
    """:class:`~infra.vectors.base.VectorStore` over ``inner`` that retries transient failures.

    ``first_wait_s`` doubles per failed attempt up to ``max_wait_s``; each wait is jittered to
    between half and all of that, so workers that lost the store together do not return in step.
    A ``Retry-After`` the server sends (HTTP 429) is waited at least. ``deadline_s``: seconds
    after a call's first failure at which it gives up (None: never). ``sleep``, ``clock`` and
    ``jitter`` are for tests.
    """

    def __init__(
        self,
        inner: VectorStore,
        *,
        first_wait_s: float = FIRST_WAIT_S,
        max_wait_s: float = MAX_WAIT_S,
        deadline_s: float | None = None,
        registry: Registry = REGISTRY,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        if not 0 < first_wait_s <= max_wait_s:
            raise ValueError(
                f"need 0 < first_wait_s <= max_wait_s, not {first_wait_s} and {max_wait_s}"
            )
        if deadline_s is not None and deadline_s <= 0:
            raise ValueError(f"deadline_s must be positive or None, not {deadline_s}")
        self.inner = inner
        self.first_wait_s = first_wait_s
        self.max_wait_s = max_wait_s
        self.deadline_s = deadline_s
        self.registry = registry
        self._sleep = sleep
        self._clock = clock
        self._jitter = jitter

    def wait_s(self, attempt: int, exc: BaseException | None = None) -> float:
        """The pause after failed attempt number ``attempt`` (1, 2, ...)."""
        ceiling = min(self.max_wait_s, self.first_wait_s * 2.0 ** min(attempt - 1, 60))
        wait = ceiling * (0.5 + 0.5 * self._jitter())
        retry_after = getattr(exc, "retry_after_s", None)
        if isinstance(retry_after, int | float) and retry_after > 0:
            wait = max(wait, float(retry_after))
        return wait

    def _call(self, op: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        failed = 0
        down_since = 0.0
        started = time.perf_counter()
        while True:
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                now = self._clock()
                down_since = down_since if failed else now
                failed += 1
                wait = self._pause(op, failed, now - down_since, exc)
                self.registry.counter(RETRIES, op=op).inc()
                log.warning(
                    "vector_store_unavailable",
                    op=op,
                    attempt=failed,
                    wait_s=round(wait, 3),
                    error=describe(exc),
                )
                self._sleep(wait)
                continue
            if failed:
                self.registry.counter(RECOVERIES, op=op).inc()
                log.info(
                    "vector_store_recovered",
                    op=op,
                    attempts=failed + 1,
                    seconds_down=round(self._clock() - down_since, 3),
                )
            self.registry.histogram(SECONDS, op=op).observe(time.perf_counter() - started)
            return result

    def _pause(self, op: str, failed: int, down_s: float, exc: Exception) -> float:
        """The wait before the next attempt, or :class:`VectorStoreUnavailable` past the
        deadline (the last attempt is made at the deadline, not after it)."""
        wait = self.wait_s(failed, exc)
        if self.deadline_s is None:
            return wait
        left = self.deadline_s - down_s
        if left > 0:
            return min(wait, left)
        self.registry.counter(GIVE_UPS, op=op).inc()
        log.error(
            "vector_store_gave_up",
            op=op,
            attempts=failed,
            seconds_down=round(down_s, 3),
            error=describe(exc),
        )
        raise VectorStoreUnavailable(
            f"vector store unavailable: {op} failed {failed} times over {down_s:.1f} s "
            f"(deadline {self.deadline_s:g} s); last error: {describe(exc)}"
        ) from exc

    # -- the VectorStore interface ---------------------------------------------------------------

    def ensure_collection(self, name: str, dim: int) -> None:
        self._call("ensure_collection", self.inner.ensure_collection, name, dim)

    def upsert(self, collection: str, points: Sequence[VectorPoint]) -> None:
        self._call("upsert", self.inner.upsert, collection, points)

    def delete(self, collection: str, keys: Sequence[str]) -> None:
        self._call("delete", self.inner.delete, collection, keys)

    def delete_where(self, collection: str, field_name: str, value: str) -> None:
        self._call("delete_where", self.inner.delete_where, collection, field_name, value)

    def retrieve(
        self, collection: str, keys: Sequence[str], *, with_vectors: bool = True
    ) -> dict[str, VectorPoint]:
        return self._call(
            "retrieve", self.inner.retrieve, collection, keys, with_vectors=with_vectors
        )

    def points_where(
        self, collection: str, field_name: str, value: str | bool, *, limit: int
    ) -> list[VectorPoint]:
        return self._call(
            "points_where", self.inner.points_where, collection, field_name, value, limit=limit
        )

    def query_batch(
        self,
        collection: str,
        vectors: Sequence[np.ndarray],
        limit: int,
        flt: Filter | None = None,
    ) -> list[list[Hit]]:
        return self._call("query_batch", self.inner.query_batch, collection, vectors, limit, flt)

    def query_keys(
        self,
        collection: str,
        vectors: Sequence[np.ndarray],
        limit: int | Sequence[int],
        flt: Filter | None = None,
    ) -> list[dict[str, float]]:
        return self._call("query_keys", self.inner.query_keys, collection, vectors, limit, flt)

    def count(self, collection: str) -> int:
        return self._call("count", self.inner.count, collection)

    def close(self) -> None:
        self.inner.close()  # not retried: a store that is down has nothing to flush to

    def __getattr__(self, name: str) -> Any:
        # Backend extras (Edge's ``optimize``) pass through, unretried.
        return getattr(self.inner, name)
