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
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import httptools

from mesh_gateway.errors import (
    BadRequest,
    PayloadTooLarge,
    UpstreamIdentityMismatch,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from mesh_gateway.identity.tls import UpstreamContext, client_context, verify_peer
from mesh_gateway.model import Credentials, Endpoint, Response, Route, SpiffeId
from mesh_gateway.pipeline import Exchange, UpstreamRequest
from mesh_gateway.spiffe import IdentityError
from mesh_gateway.upstream.http import BodyTooLarge
from mesh_gateway.watch import Watch

_HIGH_WATER = 256 * 1024  # buffered response bytes before reading from the upstream pauses
_MAX_HEAD_BYTES = 64 * 1024
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class _StaleConnection(Exception):
    """A reused connection died before any response byte: safe to retry a replayable request."""


class _Conn(asyncio.Protocol):
    """One upstream connection; carries one exchange at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: Any = None  # uvloop's SSL transport is not an asyncio.Transport subclass
        self.parser = httptools.HttpResponseParser(self)
        self.reusable = True
        self.closed = False
        self.idle_since = 0.0
        self._reset()
        self._can_write = asyncio.Event()
        self._can_write.set()

    def _reset(self) -> None:
        self.head: asyncio.Future[None] = self.loop.create_future()
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.head_bytes = 0
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.complete = False
        self.error: Exception | None = None
        self.got_bytes = False
        self.active = False
        self._wakeup: asyncio.Future[None] | None = None

    def begin(self) -> None:
        self._reset()
        self.active = True

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        self._can_write.set()
        if self.active and not self.complete:  # an idle pooled connection closing is not an error
            self._fail(_StaleConnection() if not self.got_bytes else
                       UpstreamUnavailable("upstream closed the connection mid-response"))

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamUnavailable("upstream switched protocols, which is not supported"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamUnavailable(f"malformed response from upstream: {exc}"))
        if self.buffered > _HIGH_WATER and not self.closed:
            self.transport.pause_reading()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > _MAX_HEAD_BYTES:
            raise UpstreamUnavailable("upstream response head too large")
        self.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # interim (100 Continue): llhttp completes it as a message of its own
            self.headers, self.head_bytes = [], 0
            return
        self.status = status
        if not self.parser.should_keep_alive():
            self.reusable = False
        if not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        self._wake()

    def on_message_complete(self) -> None:
        if self.status == 0:  # end of an interim response
            return
        self.complete = True
        self._wake()

    def _fail(self, error: Exception) -> None:
        self.reusable = False
        if self.error is None:
            self.error = error
        if not self.head.done():
            self.head.set_exception(error)
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    # used by the forwarder
    async def write(self, data: bytes) -> None:
        if self.head.done():  # already answered (e.g. an early 413 to an upload): the rest is not wanted
            self.reusable = False
            return
        if self.closed:
            raise _StaleConnection() if not self.got_bytes else UpstreamUnavailable("upstream connection closed")
        self.transport.write(data)
        if not self._can_write.is_set():
            await self._can_write.wait()

    async def next_chunk(self, idle_timeout_s: float) -> bytes | None:
        """The next body chunk, None at the end of the response."""
        while not self.chunks:
            if self.complete:
                return None
            if self.error is not None:
                raise self.error
            self._wakeup = self.loop.create_future()
            try:
                async with asyncio.timeout(idle_timeout_s):
                    await self._wakeup
            except TimeoutError:
                raise UpstreamTimeout("upstream went idle mid-body") from None
        chunk = self.chunks.popleft()
        self.buffered -= len(chunk)
        if self.buffered <= _HIGH_WATER // 2 and not self.closed:
            self.transport.resume_reading()
        return chunk

    def close(self) -> None:
        self.reusable = False
        if not self.closed and self.transport is not None:
            self.transport.close()
        self.closed = True


class _Pool:
    def __init__(self, size: int) -> None:
        self.idle: deque[_Conn] = deque()
        self.slots = asyncio.Semaphore(size)


class H1Forwarder:
    def __init__(self, credentials: Watch[Credentials], *, pool_size: int = 256, keepalive_s: float = 30.0) -> None:
        self._credentials = credentials
        self._contexts: dict[tuple[SpiffeId | None, int], UpstreamContext] = {}
        self._pools: dict[tuple[str, int, int], _Pool] = {}
        self._pool_size = pool_size
        self._keepalive_s = keepalive_s

    async def close(self) -> None:
        for pool in self._pools.values():
            while pool.idle:
                pool.idle.pop().close()
        self._pools.clear()

    def _context(self, endpoint: Endpoint) -> UpstreamContext | None:
        if endpoint.tls == "plain":
            return None
        version = self._credentials.version
        key = (endpoint.spiffe_id, version)
        context = self._contexts.get(key)
        if context is None:
            creds = self._credentials.get()
            if len(self._contexts) > 1024 or any(v != version for _, v in self._contexts):
                self._contexts = {k: c for k, c in self._contexts.items() if k[1] == version}
            context = client_context(creds if endpoint.tls == "mtls" else None, creds.bundle_pem,
                                     expected=endpoint.spiffe_id)
            self._contexts[key] = context
        return context

    async def _connect(self, endpoint: Endpoint, context: UpstreamContext | None, route: Route) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(route.policy.connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _Conn(loop), endpoint.address, endpoint.port, ssl=context,
                    server_hostname=endpoint.address if context is not None else None)
        except TimeoutError:
            raise UpstreamTimeout(f"connecting to {endpoint.key} took over "
                                  f"{route.policy.connect_timeout_s}s") from None
        except OSError as exc:  # ssl.SSLError included
            raise UpstreamUnavailable(f"{endpoint.key}: {type(exc).__name__}: {exc}") from None
        if context is not None and context.expected_spiffe_id is not None:
            try:
                verify_peer(conn.transport.get_extra_info("ssl_object"), context.expected_spiffe_id)
            except IdentityError as exc:
                conn.close()
                raise UpstreamIdentityMismatch(str(exc)) from None
        return conn

    def _checkout(self, pool: _Pool) -> _Conn | None:
        now = asyncio.get_running_loop().time()
        while pool.idle:
            conn = pool.idle.pop()  # most recently used first: the warmest, least likely to have timed out
            if not conn.closed and now - conn.idle_since < self._keepalive_s:
                return conn
            conn.close()
        return None

    def _checkin(self, pool: _Pool, conn: _Conn) -> None:
        if conn.reusable and not conn.closed and not conn.chunks:
            conn.idle_since = asyncio.get_running_loop().time()
            pool.idle.append(conn)
        else:
            conn.close()

    async def forward(self, request: UpstreamRequest, endpoint: Endpoint, route: Route,
                      exchange: Exchange) -> Response:
        context = self._context(endpoint)
        key = (endpoint.address, endpoint.port, id(context))
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool(self._pool_size)
        head = _request_head(request, exchange.info.content_length)
        policy = route.policy
        try:
            async with asyncio.timeout(policy.timeout_s):
                await pool.slots.acquire()
                try:
                    conn = await self._exchange(pool, endpoint, context, route, head, request)
                except BaseException:
                    pool.slots.release()
                    raise
        except TimeoutError:
            raise UpstreamTimeout(f"no response from {endpoint.key} within {policy.timeout_s}s") from None
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

    async def _exchange(self, pool: _Pool, endpoint: Endpoint, context: UpstreamContext | None, route: Route,
                        head: bytes, request: UpstreamRequest) -> _Conn:
        replayable = request.body is None
        conn = self._checkout(pool)
        if conn is None:
            conn = await self._connect(endpoint, context, route)
        try:
            return await self._send(conn, head, request)
        except _StaleConnection:
            conn.close()
            if not replayable:
                raise UpstreamUnavailable(f"{endpoint.key}: connection closed before the response") from None
        except BaseException:
            conn.close()
            raise
        conn = await self._connect(endpoint, context, route)
        try:
            return await self._send(conn, head, request)
        except _StaleConnection:
            conn.close()
            raise UpstreamUnavailable(f"{endpoint.key}: connection closed before the response") from None
        except BaseException:
            conn.close()
            raise

    async def _send(self, conn: _Conn, head: bytes, request: UpstreamRequest) -> _Conn:
        conn.begin()
        if request.body is None:
            await conn.write(head)
        else:
            await conn.write(head)
            await _send_body(conn, request.body, chunked=b"transfer-encoding: chunked" in head)
        await conn.head
        return conn

    def release(self, pool: _Pool, conn: _Conn) -> None:
        # A half-read response leaves the connection mid-message: it must not go back to the pool.
        if not conn.complete:
            conn.close()
        self._checkin(pool, conn)
        pool.slots.release()


class _BodyStream:
    """The response body as an async iterator whose aclose() always returns the connection, even if the edge never
    started reading (an async generator's cleanup would not run then, leaking the pool slot)."""

    def __init__(self, owner: H1Forwarder | None, held: tuple[_Pool, _Conn] | None, idle_timeout_s: float) -> None:
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


async def _send_body(conn: _Conn, body: AsyncIterator[bytes], *, chunked: bool) -> None:
    try:
        async for chunk in body:
            if conn.head.done():  # the upstream answered before taking the whole body: stop sending it
                conn.reusable = False
                return
            if chunk:
                await conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
    except BodyTooLarge:
        raise PayloadTooLarge("request body over the cap") from None
    if chunked:
        await conn.write(b"0\r\n\r\n")


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
