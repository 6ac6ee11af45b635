"""Resilience around the real forwarder: circuit limits, per-try timeouts, retries, outlier accounting.

`ResilientForwarder` is a `Forwarder`, so the pipeline stays route → authorize → pick → forward. Retry rules:
- at most route.policy.retries extra attempts, each on another endpoint when one is usable, after a jittered
  exponential backoff, all within the route's overall timeout;
- retried on a connect failure (nothing was sent, so any method), and — for idempotent methods whose body could be
  kept for replay — on a reset connection, a per-try timeout or a 503 answer;
- a request whose body was (partly) sent is otherwise never sent again: a POST is not retried after its bytes left.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

from mesh_gateway.config import Resilience
from mesh_gateway.errors import (
    GatewayError,
    UpstreamConnectFailed,
    UpstreamIdentityMismatch,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from mesh_gateway.model import Body, Catalog, Endpoint, Response, Route
from mesh_gateway.pipeline import Exchange, Forwarder, UpstreamRequest
from mesh_gateway.upstream.balancing import HealthAwarePicker
from mesh_gateway.upstream.circuit import Circuits
from mesh_gateway.upstream.deadline import await_until
from mesh_gateway.upstream.h1 import H1Forwarder
from mesh_gateway.upstream.outlier import OutlierDetector
from mesh_gateway.watch import Watch

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
NOTHING_SENT = (UpstreamConnectFailed, UpstreamIdentityMismatch)
DRAIN_CAP = 64 * 1024


class ReplayableBody:
    """The request body, kept (up to `cap` bytes) as it is read, so that a retry can send it again."""

    def __init__(self, source: Body, cap: int) -> None:
        self._source = source
        self._cap = cap
        self._kept: list[bytes] = []
        self._size = 0
        self._done = False
        self.pulled = False
        self.overflowed = False

    @property
    def replayable(self) -> bool:
        return not self.overflowed

    async def stream(self) -> AsyncIterator[bytes]:
        for chunk in list(self._kept):
            yield chunk
        while not self._done:
            try:
                chunk = await anext(self._source)
            except StopAsyncIteration:
                self._done = True
                return
            self.pulled = True
            if not self.overflowed:
                self._size += len(chunk)
                if self._size > self._cap:
                    self.overflowed = True
                    self._kept.clear()
                else:
                    self._kept.append(chunk)
            yield chunk


class TrackedBody:
    """The response body, calling `done` exactly once when it ends, fails or is closed (even if never read)."""

    def __init__(self, inner: Body, done: Callable[[], None]) -> None:
        self._inner = inner
        self._done: Callable[[], None] | None = done

    def _finish(self) -> None:
        if self._done is not None:
            done, self._done = self._done, None
            done()

    def __aiter__(self) -> TrackedBody:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await anext(self._inner)
        except BaseException:
            self._finish()
            raise

    async def aclose(self) -> None:
        self._finish()
        close = getattr(self._inner, "aclose", None)
        if close is not None:
            await close()


class ResilientForwarder:
    def __init__(self, inner: Forwarder, *, picker: HealthAwarePicker, outlier: OutlierDetector,
                 circuits: Circuits, catalog: Watch[Catalog], settings: Resilience,
                 rng: random.Random | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        # H1Forwarder can leave all timing to us: the attempt's timer already bounds the whole call.
        self._send: Callable[[UpstreamRequest, Endpoint, Route, Exchange], Awaitable[Response]] = \
            inner.forward_within_deadline if isinstance(inner, H1Forwarder) else inner.forward
        self._picker = picker
        self._outlier = outlier
        self._circuits = circuits
        self._catalog = catalog
        self._settings = settings
        self._rng = rng or random.Random()
        self._sleep = sleep

    async def forward(self, request: UpstreamRequest, endpoint: Endpoint, route: Route,
                      exchange: Exchange) -> Response:
        circuit = self._circuits.get(route.service)
        await circuit.acquire(route.policy.connect_timeout_s)
        try:
            response = await self._attempts(request, endpoint, route, exchange)
        except BaseException:
            circuit.release()
            raise
        if isinstance(response.body, bytes):
            circuit.release()
        else:
            response.body = TrackedBody(response.body, circuit.release)
        return response

    def _set_size(self, service: str) -> int:
        endpoints = self._catalog.get().get(service)
        return len(endpoints.endpoints) if endpoints else 0

    async def _attempts(self, request: UpstreamRequest, endpoint: Endpoint, route: Route,
                        exchange: Exchange) -> Response:
        policy = route.policy
        loop = asyncio.get_running_loop()
        # One deadline for the whole request (route timeout → 504, never retried). Each attempt runs under a single
        # timer ending at the earlier of that deadline and its own per-try limit, rather than a scope per limit:
        # every scope costs a timer, and the one that ends first decides which timeout it was anyway. (await_until
        # is asyncio.timeout_at without most of its cost; the rare retry path below keeps the stdlib one.)
        deadline = loop.time() + policy.timeout_s
        per_try = policy.per_try_timeout_s
        body = ReplayableBody(request.body, self._settings.max_replay_bytes) if request.body is not None else None
        idempotent = request.method in IDEMPOTENT
        tried: set[str] = set()
        attempt = 0
        while True:
            to_drain: Response | None = None
            exchange.endpoint = endpoint
            last = attempt >= policy.retries
            try_deadline = deadline if per_try is None else min(deadline, loop.time() + per_try)
            try:
                # Without a body the request is sent as it is; a body gets a fresh stream that replays what was kept.
                response = await await_until(loop, try_deadline, self._try(
                    request if body is None else replace(request, body=body.stream()), endpoint, route, exchange))
            except (GatewayError, TimeoutError) as failure:
                if isinstance(failure, TimeoutError):
                    if try_deadline >= deadline:
                        raise _route_timeout(route) from None
                    error: GatewayError = UpstreamTimeout(
                        f"{endpoint.key}: no response within the per-try timeout {per_try}s")
                else:
                    error = failure
                if not isinstance(error, UpstreamUnavailable | UpstreamTimeout | UpstreamIdentityMismatch):
                    raise
                self._outlier.failure(route.service, endpoint, self._set_size(route.service))
                nothing_sent = isinstance(error, NOTHING_SENT) and (body is None or not body.pulled)
                if last or not (nothing_sent or (idempotent and (body is None or body.replayable))):
                    if error is failure:
                        raise
                    raise error from None
            else:
                if response.status >= 500:
                    self._outlier.failure(route.service, endpoint, self._set_size(route.service))
                else:
                    self._outlier.success(route.service, endpoint)
                if response.status != 503 or last or not idempotent or (body is not None and not body.replayable):
                    return response
                to_drain = response
            tried.add(endpoint.key)
            attempt += 1
            exchange.retries = attempt
            try:
                async with asyncio.timeout_at(deadline):
                    if to_drain is not None:
                        await _drain(to_drain)
                    await self._sleep(
                        self._settings.retry_backoff_s * 2 ** (attempt - 1) * self._rng.uniform(0.5, 1.5))
            except TimeoutError:
                raise _route_timeout(route) from None
            endpoint = self._picker.pick_from(self._catalog.get().get(route.service), route, frozenset(tried))

    async def _try(self, request: UpstreamRequest, endpoint: Endpoint, route: Route,
                   exchange: Exchange) -> Response:
        self._picker.started(endpoint)
        try:
            response = await self._send(request, endpoint, route, exchange)
        except BaseException:  # incl. the cancellation by the attempt's timer
            self._picker.finished(endpoint)
            raise
        if isinstance(response.body, bytes):
            self._picker.finished(endpoint)
        else:
            response.body = TrackedBody(response.body, lambda: self._picker.finished(endpoint))
        return response


def _route_timeout(route: Route) -> UpstreamTimeout:
    return UpstreamTimeout(f"{route.service}: no response within {route.policy.timeout_s}s")


async def _drain(response: Response) -> None:
    """Read away a 503's small body so its connection can be reused; a large one is cut instead."""
    body = response.body
    if isinstance(body, bytes):
        return
    seen = 0
    try:
        async for chunk in body:
            seen += len(chunk)
            if seen > DRAIN_CAP:
                break
    except GatewayError:
        pass
    finally:
        close = getattr(body, "aclose", None)
        if close is not None:
            await close()
