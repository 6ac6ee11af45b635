"""One HTTP/1.1 client connection of the h1 server (edges/h1_server.py): httptools callbacks build request heads,
requests are answered in order by one task at a time, bodies stream both ways with backpressure."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, cast

import httptools

from mesh_gateway.edges.h1_wire import CONTINUE, ResponseHead, request_bytes
from mesh_gateway.edges.http import NO_FACTS, RequestHead, connection_facts
from mesh_gateway.errors import BadRequest, ClientClosedRequest, GatewayError, HeadersTooLarge, RequestTimeout
from mesh_gateway.model import Response
from mesh_gateway.pipeline import Exchange
from mesh_gateway.upstream.http import BodyTooLarge

if TYPE_CHECKING:
    from mesh_gateway.edges.h1_server import H1Server

log = logging.getLogger("mesh_gateway.edge.h1")

_HIGH_WATER = 256 * 1024
"""Request body bytes buffered per connection before the gateway stops reading from the client."""
_MAX_PIPELINED = 16
"""Requests received ahead of the one being answered before the gateway stops reading."""


class _Request:
    __slots__ = ("body", "buffered", "complete", "expect_continue", "failure", "head", "keep_alive", "waiter")

    def __init__(self, head: RequestHead, keep_alive: bool, expect_continue: bool = False,
                 failure: GatewayError | None = None) -> None:
        self.head = head
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue
        self.failure = failure
        """Why the rest of this request cannot be read (refused before its head was complete, or unparsable)."""
        self.body: deque[bytes] = deque()
        self.buffered = 0
        self.complete = False
        self.waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class H1Connection(asyncio.Protocol):
    def __init__(self, server: H1Server) -> None:
        self._server = server
        self._edge = server.edge
        self._limits = server.edge.limits
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._facts = NO_FACTS
        self._url: list[bytes] = []
        self._fields: list[tuple[str, str]] = []
        self._head_bytes = 0
        self._line_cap = 2 * self._limits.max_request_line_bytes
        self._head_cap = 2 * (self._limits.max_header_bytes + self._limits.max_request_line_bytes)
        self._in_head = False
        self._receiving: _Request | None = None
        self._queue: deque[_Request] = deque()  # [0] is being answered; the rest arrived pipelined behind it
        self._buffered = 0
        self._task: asyncio.Task[None] | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._reading_paused = False
        self._writable: asyncio.Future[None] | None = None
        self._closing = False
        self._lost = False
        self._oversize = False
        self._done_reading = False
        self._reparse: bytes | None = None
        self._upgrade_head = b""
        self._upgrade: bytes | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio subclasses
        self._facts = connection_facts(transport)
        self._server.connections.add(self)
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        if self._upgrade is not None:  # waiting to hand the connection over: keep what the client sends
            self._upgrade += data
            return
        while data and not self._done_reading:
            try:
                self._parser.feed_data(data)
                if self._in_head:
                    # httptools buffers a header value until it ends, unseen by on_header: count what it holds.
                    self._head_bytes += len(data)
                    self._oversize = self._oversize or self._head_bytes > self._head_cap
                data = b""
            except httptools.HttpParserUpgrade as upgrade:
                rest = data[upgrade.args[0]:]
                if self._reparse is None:  # a WebSocket: aiohttp takes the connection once earlier answers are out
                    self._upgrade = (self._upgrade or b"") + rest
                    self._hand_over_when_idle()
                    return
                # An upgrade nobody here speaks: parse the same request again without its Upgrade header.
                data, self._reparse = self._reparse + rest, None
                self._parser = httptools.HttpRequestParser(self)
            except httptools.HttpParserError as exc:
                self._stop_reading(BadRequest(f"unparsable request: {exc}", public_message="malformed request"))
                return
            if self._oversize:
                self._stop_reading(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._server.forget(self)
        if self._idle is not None:
            self._idle.cancel()
        for request in self._queue:
            request.wake()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    # -- httptools callbacks ---------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = []
        self._fields = []
        self._head_bytes = 0
        self._in_head = True

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self._head_bytes += len(url)
        if len(url) > self._line_cap or (len(self._url) > 1 and sum(map(len, self._url)) > self._line_cap):
            self._oversize = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._oversize:
            return
        self._fields.append((name.decode("latin-1").lower(), value.decode("latin-1")))
        limits = self._limits
        if len(self._fields) > 2 * limits.max_headers or self._head_bytes > self._head_cap:
            self._oversize = True

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._oversize:
            return
        parser = self._parser
        method = parser.get_method().decode("latin-1")
        head = RequestHead(method=method, target=b"".join(self._url).decode("latin-1"),
                           protocol=f"HTTP/{parser.get_http_version()}", fields=self._fields)
        self._receiving = None
        if method == "CONNECT":
            self._enqueue(head, keep_alive=False, failure=BadRequest(
                "CONNECT is not supported", public_message="method not supported")).complete = True
            self._done_reading = True
        elif not parser.should_upgrade():
            expect = any(n == "expect" and v.lower() == "100-continue" for n, v in head.fields)
            self._receiving = self._enqueue(head, keep_alive=parser.should_keep_alive(), expect_continue=expect)
        elif self._wants_websocket(head):
            self._upgrade = b""
            self._upgrade_head = request_bytes(head)
        else:
            self._reparse = request_bytes(head, without="upgrade")

    def on_body(self, body: bytes) -> None:
        request = self._receiving
        if request is None:
            return
        request.body.append(body)
        request.buffered += len(body)
        self._buffered += len(body)
        request.wake()
        self._flow()

    def on_message_complete(self) -> None:
        request = self._receiving
        if request is not None:
            request.complete = True
            request.wake()
            self._receiving = None

    # -- requests --------------------------------------------------------------------------------------------

    def _enqueue(self, head: RequestHead, *, keep_alive: bool, expect_continue: bool = False,
                 failure: GatewayError | None = None) -> _Request:
        request = _Request(head, keep_alive, expect_continue, failure)
        self._queue.append(request)
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if self._task is None:
            self._task = self._loop.create_task(self._answer_queue())
        self._flow()
        return request

    def _wants_websocket(self, head: RequestHead) -> bool:
        return (self._server.upgrades is not None and self._edge.websockets is not None and head.method == "GET"
                and any(n == "upgrade" and v.lower() == "websocket" for n, v in head.fields))

    def _stop_reading(self, error: GatewayError | None) -> None:
        """Nothing more can be read from this client: a head over twice the limits (error None: the edge core
        names the limit), or bytes that are not HTTP. Answer what was received, in order, then close."""
        self._done_reading = True
        request = self._receiving
        if request is not None and error is not None:  # broken in the middle of a body being streamed
            request.failure = error
            request.keep_alive = False
            request.wake()
        else:
            try:
                method = self._parser.get_method().decode("latin-1")
            except httptools.HttpParserError:
                method = ""
            head = RequestHead(method, b"".join(self._url).decode("latin-1"), "HTTP/1.1", self._fields)
            # An oversized head is refused by the edge core with the limit it broke (414/431); this is the fallback.
            failure = error or HeadersTooLarge(f"request head of over {self._head_bytes} bytes")
            self._enqueue(head, keep_alive=False, failure=failure).complete = True
        self._receiving = None
        if self._transport is not None and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()

    async def _answer_queue(self) -> None:
        try:
            while self._queue and not self._lost:
                request = self._queue[0]
                keep_alive = await self._answer(request)
                self._queue.popleft()
                self._buffered -= request.buffered
                if not keep_alive:
                    self._close()
                    return
                self._flow()
        except Exception:
            # A bug, not a client: never leave the connection open with nobody answering on it.
            log.exception("HTTP/1.1 connection failed; closing it")
            self.abort()
            return
        finally:
            self._task = None
        if self._upgrade is not None:
            self._hand_over_when_idle()
        elif self._server.draining:
            self._close()
        elif not self._lost:
            self._arm_idle()

    async def _answer(self, request: _Request) -> bool:
        """Answer one request; whether the connection may carry another."""
        exchange = self._edge.open(request.head, self._facts)
        if exchange.error is None and request.failure is not None:
            exchange.error = request.failure
            exchange.span.fail(request.failure)
        has_body = bool(request.body) or not request.complete
        body = self._body(request, exchange) if has_body and exchange.error is None else None
        response = await self._edge.respond(exchange, body)
        keep_alive = request.keep_alive and request.complete and not self._server.draining
        sent, whole = await self._write(request, response, exchange, keep_alive)
        self._edge.finish(exchange, response.status, sent)
        return whole and keep_alive and not self._lost

    async def _body(self, request: _Request, exchange: Exchange) -> AsyncIterator[bytes]:
        if request.expect_continue and not request.complete and not request.body and self._transport is not None:
            self._transport.write(CONTINUE)  # routed and authorized: the body is wanted
        cap = self._edge.body_cap(exchange)
        while True:
            if request.body:
                chunk = request.body.popleft() if len(request.body) == 1 else b"".join(request.body)
                request.body.clear()
                request.buffered -= len(chunk)
                self._buffered -= len(chunk)
                self._flow()
                exchange.bytes_in += len(chunk)
                if exchange.bytes_in > cap:
                    raise BodyTooLarge()
                yield chunk
            elif request.complete:
                return
            elif request.failure is not None:
                raise request.failure
            elif self._lost:
                raise ClientClosedRequest("client went away while sending the request body")
            else:
                request.waiter = self._loop.create_future()
                try:
                    async with asyncio.timeout(self._limits.idle_timeout_s):
                        await request.waiter
                except TimeoutError:
                    raise RequestTimeout("request body stalled") from None
                finally:
                    request.waiter = None

    async def _write(self, request: _Request, response: Response, exchange: Exchange,
                     keep_alive: bool) -> tuple[int, bool]:
        """Send the response; (body bytes sent, whether it went out whole)."""
        head = ResponseHead(response, request.head.method, request.head.protocol, keep_alive)
        body = response.body
        transport = self._transport
        assert transport is not None
        if isinstance(body, bytes):
            if not self._lost:
                transport.write(head.prefix + body if head.has_body else head.prefix)
            return (len(body) if head.has_body else 0), head.keep_alive
        sent = 0
        started = False
        try:
            async for chunk in body:
                if self._lost:
                    return sent, False
                if not chunk or not head.has_body:
                    continue
                data = head.frame(chunk)
                transport.write(data if started else head.prefix + data)
                started = True
                sent += len(chunk)
                if self._writable is not None:
                    await self._writable
            end = head.frame(b"") if head.has_body else b""
            if not self._lost and (end or not started):
                transport.write(end if started else head.prefix + end)
            return sent, head.keep_alive
        except GatewayError as error:
            # The head may be out already: cut the connection so the client cannot take a truncated body for whole.
            log.warning("response aborted: %s", error.detail or error.public_message)
            exchange.error = error
            transport.close()
            return sent, False
        finally:
            await body.aclose()  # type: ignore[attr-defined]

    # -- connection management -------------------------------------------------------------------------------

    def _flow(self) -> None:
        transport = self._transport
        if transport is None or self._closing:
            return
        wanted = self._buffered > _HIGH_WATER or len(self._queue) > _MAX_PIPELINED
        if wanted and not self._reading_paused:
            self._reading_paused = True
            transport.pause_reading()
        elif not wanted and self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()

    def _arm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = self._loop.call_later(self._limits.idle_timeout_s, self._idle_expired)

    def _idle_expired(self) -> None:
        self._idle = None
        if not self._queue:
            self._close()

    def _hand_over_when_idle(self) -> None:
        """Give the connection, with the upgrade request, to aiohttp once every earlier request is answered."""
        if self._task is not None or self._transport is None or self._lost:
            return
        upgrades, transport = self._server.upgrades, self._transport
        assert upgrades is not None and self._upgrade is not None
        if self._idle is not None:
            self._idle.cancel()
        self._server.forget(self)
        protocol = upgrades()
        if self._reading_paused:
            transport.resume_reading()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        protocol.data_received(self._upgrade_head + self._upgrade)

    def drain(self) -> None:
        if not self._queue:
            self._close()

    def _close(self) -> None:
        self._closing = True
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

