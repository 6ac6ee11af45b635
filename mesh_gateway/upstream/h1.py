"""HTTP/1.1 forwarder on asyncio Protocols + httptools: the same contract as upstream/http.py at a third of the cost.

Measured (docs/performance.md): aiohttp's ClientSession costs ≈100 µs of CPU per proxied request here, most of
the gateway's budget; this client does the same job — keep-alive pools, mTLS with the current SVID, the upstream's
SPIFFE ID checked right after the handshake, streamed bodies both ways, per-phase timeouts — in ≈35 µs.

Pools are keyed by (address, port, SSLContext); the context is per (expected SPIFFE ID, credentials version), so a
connection verified for one identity never serves another, and a rotated SVID starts new connections while old
ones finish. A request that fails on a reused keep-alive connection before any response byte arrived (the server
closed it while idle) is retried once on a new connection when its body can be replayed.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

from mesh_gateway.errors import (
    BadRequest,
    UpstreamConnectFailed,
    UpstreamIdentityMismatch,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from mesh_gateway.identity.tls import UpstreamContext, UpstreamContexts, verify_peer
from mesh_gateway.model import Credentials, Endpoint, Response, Route
from mesh_gateway.pipeline import Exchange, UpstreamRequest
from mesh_gateway.spiffe import IdentityError
from mesh_gateway.upstream.h1_connection import HIGH_WATER, StaleConnection, UpstreamConnection
from mesh_gateway.watch import Watch

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class _Pool:
    def __init__(self, size: int) -> None:
        self.idle: deque[UpstreamConnection] = deque()
        self.slots = asyncio.Semaphore(size)


class H1Forwarder:
    def __init__(self, credentials: Watch[Credentials], *, pool_size: int = 256, keepalive_s: float = 30.0,
                 open_connections: Callable[[str, int], None] | None = None) -> None:
        """`open_connections(service, delta)` is told of every upstream connection opened (+1) and closed (-1)."""
        self._open_connections = open_connections
        self._contexts = UpstreamContexts(credentials)
        self._pools: dict[tuple[str, int, int], _Pool] = {}
        self._pool_size = pool_size
        self._keepalive_s = keepalive_s

    async def close(self) -> None:
        for pool in self._pools.values():
            while pool.idle:
                pool.idle.pop().close()
        self._pools.clear()

    async def _connect(self, endpoint: Endpoint, context: UpstreamContext | None, route: Route) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(route.policy.connect_timeout_s):
                report = self._open_connections
                on_change = (lambda delta: report(route.service, delta)) if report is not None else None
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(loop, on_change), endpoint.address, endpoint.port, ssl=context,
                    server_hostname=endpoint.address if context is not None else None)
        except TimeoutError:
            raise UpstreamConnectFailed(f"{endpoint.key}: connect timed out") from None
        except OSError as exc:  # refused, unreachable, TLS handshake failed (ssl.SSLError): nothing was sent
            raise UpstreamConnectFailed(f"{endpoint.key}: {type(exc).__name__}: {exc}") from None
        if context is not None and context.expected_spiffe_id is not None:
            try:
                verify_peer(conn.transport.get_extra_info("ssl_object"), context.expected_spiffe_id)
            except IdentityError as exc:
                conn.close()
                raise UpstreamIdentityMismatch(str(exc)) from None
        return conn

    def _checkout(self, pool: _Pool) -> UpstreamConnection | None:
        now = time.monotonic()
        while pool.idle:
            conn = pool.idle.pop()  # most recently used first: the warmest, least likely to have timed out
            if not conn.closed and now - conn.idle_since < self._keepalive_s:
                return conn
            conn.close()
        return None

    def _checkin(self, pool: _Pool, conn: UpstreamConnection) -> None:
        if conn.reusable and not conn.closed and not conn.chunks and (conn.sender is None or conn.sender.done()):
            conn.idle_since = time.monotonic()
            pool.idle.append(conn)
        else:
            conn.close()

    async def forward(self, request: UpstreamRequest, endpoint: Endpoint, route: Route,
                      exchange: Exchange) -> Response:
        """Forward with the route's timeout bounding the wait for a connection and the response head: for a caller
        that sets no deadline of its own (the sidecar's inbound side)."""
        return await self._forward(request, endpoint, route, exchange, route.policy.timeout_s)

    async def forward_within_deadline(self, request: UpstreamRequest, endpoint: Endpoint, route: Route,
                                      exchange: Exchange) -> Response:
        """Forward without a timer of our own, for a caller that bounds the whole call (ResilientForwarder): a
        second timer for the same route timeout, started later, could never end first."""
        return await self._forward(request, endpoint, route, exchange, None)

    async def _forward(self, request: UpstreamRequest, endpoint: Endpoint, route: Route, exchange: Exchange,
                       timeout_s: float | None) -> Response:
        context = self._contexts.for_endpoint(endpoint)
        key = (endpoint.address, endpoint.port, id(context))
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool(self._pool_size)
        head = _request_head(request, exchange.info.content_length)
        policy = route.policy
        if timeout_s is None:
            conn = await self._open(pool, endpoint, context, route, head, request)
        else:
            try:
                async with asyncio.timeout(timeout_s):
                    conn = await self._open(pool, endpoint, context, route, head, request)
            except TimeoutError:
                raise UpstreamTimeout(f"no response from {endpoint.key} within {timeout_s}s") from None
        if conn.sender is not None:
            try:
                await _settle(conn, conn.sender)
            except BaseException:
                conn.close()
                pool.slots.release()
                raise
        if conn.complete and conn.status not in (204, 304) and request.method != "HEAD":
            # The whole response is here already: hand the edge bytes and skip the streaming machinery.
            body = b"".join(conn.chunks)
            conn.chunks.clear()
            self._checkin(pool, conn)
            pool.slots.release()
            return Response(conn.status, conn.headers, body, endpoint.key)
        if request.method == "HEAD":  # llhttp cannot know a HEAD response has no body: no reuse
            conn.close()
            pool.slots.release()
            return Response(conn.status, conn.headers, _BodyStream(None, None, 0.0), endpoint.key)
        return Response(conn.status, conn.headers, _BodyStream(self, (pool, conn), policy.idle_timeout_s),
                        endpoint.key)

    async def _open(self, pool: _Pool, endpoint: Endpoint, context: UpstreamContext | None, route: Route,
                    head: bytes, request: UpstreamRequest) -> UpstreamConnection:
        """Take a pool slot and send the request on a connection; the connection once its response head is in."""
        await pool.slots.acquire()
        try:
            return await self._exchange(pool, endpoint, context, route, head, request)
        except BaseException:
            pool.slots.release()
            raise

    async def _exchange(self, pool: _Pool, endpoint: Endpoint, context: UpstreamContext | None, route: Route,
                        head: bytes, request: UpstreamRequest) -> UpstreamConnection:
        conn = self._checkout(pool)
        # Only a reused connection can be stale; a new one that dies is an upstream failure (for the retry policy).
        retry_if_stale = conn is not None and request.body is None
        if conn is None:
            conn = await self._connect(endpoint, context, route)
        try:
            return await self._send(conn, head, request)
        except StaleConnection:
            conn.close()
            if not retry_if_stale:
                raise UpstreamUnavailable(f"{endpoint.key}: connection closed before the response") from None
        except BaseException:
            conn.close()
            raise
        conn = await self._connect(endpoint, context, route)
        try:
            return await self._send(conn, head, request)
        except StaleConnection:
            conn.close()
            raise UpstreamUnavailable(f"{endpoint.key}: connection closed before the response") from None
        except BaseException:
            conn.close()
            raise

    async def _send(self, conn: UpstreamConnection, head: bytes, request: UpstreamRequest) -> UpstreamConnection:
        conn.begin()
        await conn.write(head)
        if request.body is not None:
            # The body goes out beside the response coming in, as upstreams may answer (or echo) before the
            # upload ends; sending it all first would deadlock against a streaming echo under flow control.
            sender = conn.sender = asyncio.get_running_loop().create_task(
                _send_body(conn, request.body, chunked=b"transfer-encoding: chunked" in head))
            sender.add_done_callback(_retrieve)
            await asyncio.wait((conn.head, sender), return_when=asyncio.FIRST_COMPLETED)
            if sender.done() and not sender.cancelled() and sender.exception() is not None and not conn.head.done():
                raise sender.exception()  # type: ignore[misc]
        await conn.head
        return conn

    def release(self, pool: _Pool, conn: UpstreamConnection) -> None:
        # A half-read response leaves the connection mid-message: it must not go back to the pool.
        if not conn.complete:
            conn.close()
        self._checkin(pool, conn)
        pool.slots.release()


class _BodyStream:
    """The response body as an async iterator whose aclose() always returns the connection, even if the edge never
    started reading (an async generator's cleanup would not run then, leaking the pool slot)."""

    def __init__(self, owner: H1Forwarder | None, held: tuple[_Pool, UpstreamConnection] | None,
                 idle_timeout_s: float) -> None:
        self._owner = owner
        self._held = held
        self._idle_timeout_s = idle_timeout_s

    def __aiter__(self) -> _BodyStream:
        return self

    async def __anext__(self) -> bytes:
        if self._held is None:
            raise StopAsyncIteration
        try:
            chunk = await self._held[1].next_chunk(self._idle_timeout_s)
        except BaseException:
            await self.aclose()
            raise
        if chunk is None:
            await self.aclose()
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        held, self._held = self._held, None
        if held is not None and self._owner is not None:
            self._owner.release(*held)


async def _send_body(conn: UpstreamConnection, body: AsyncIterator[bytes], *, chunked: bool) -> None:
    try:
        async for chunk in body:
            if chunk:
                await conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
        if chunked:
            await conn.write(b"0\r\n\r\n")
    except (StaleConnection, UpstreamUnavailable):
        if not conn.head.done():
            raise UpstreamUnavailable("upstream closed the connection while the request body was sent") from None
        # Already answered (an early 413, say): the rest of the body is simply not wanted.
    except BaseException:
        conn.close()  # the body stream failed (over the cap, client gone): the upstream saw a truncated request
        raise


async def _settle(conn: UpstreamConnection, sender: asyncio.Task[None]) -> None:
    """Hold an early answer until the upload is over, so that a body breaking the cap (or a client vanishing)
    still gives a clean error rather than a response cut short. Stops holding once the answer is complete or
    half the read buffer is full: an upstream echoing a large upload must not stall against its own output."""
    while not sender.done() and not conn.complete and conn.error is None and conn.buffered < HIGH_WATER // 2:
        wakeup = conn.wakeup()
        await asyncio.wait((wakeup, sender), return_when=asyncio.FIRST_COMPLETED)
    if sender.done() and not sender.cancelled() and (error := sender.exception()) is not None:
        raise error


def _retrieve(task: asyncio.Task[None]) -> None:
    """The body sender's failure after the answer arrived surfaces through the closed connection instead."""
    if not task.cancelled():
        task.exception()


def _request_head(request: UpstreamRequest, content_length: int | None) -> bytes:
    lines = [f"{request.method} {request.target} HTTP/1.1\r\n", f"host: {request.host}\r\n"]
    lines.extend(f"{name}: {value}\r\n" for name, value in request.headers)
    if request.body is None:
        if request.method in _BODY_METHODS:
            lines.append("content-length: 0\r\n")
    elif content_length is not None:
        lines.append(f"content-length: {content_length}\r\n")
    else:
        lines.append("transfer-encoding: chunked\r\n")
    lines.append("\r\n")
    head = "".join(lines)
    # Each line above ends in exactly one CRLF; any other CR or LF came from a header value and would split it.
    if head.count("\n") != len(lines) or head.count("\r") != len(lines):
        raise BadRequest("header value contains a line break")
    return head.encode("latin-1")
