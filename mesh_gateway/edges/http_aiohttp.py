"""HTTP/1.1 on aiohttp's low-level server: `listeners[].server: aiohttp`, and every WebSocket session (the h1
server hands upgrade requests over to it). Converts aiohttp's request into a `RequestHead` for the edge core and
the core's `Response` back; nothing else.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from aiohttp.web_exceptions import HTTPException

from mesh_gateway.edges.http import ConnectionFacts, HttpEdge, RequestHead, connection_facts
from mesh_gateway.errors import GatewayError
from mesh_gateway.model import Response
from mesh_gateway.pipeline import Exchange
from mesh_gateway.upstream.http import BodyTooLarge

log = logging.getLogger("mesh_gateway.edge")

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class AiohttpEdge:
    def __init__(self, edge: HttpEdge) -> None:
        self.edge = edge
        # Keyed by the connection's SSLObject or transport, so an entry goes away with its connection.
        self._facts: weakref.WeakKeyDictionary[Any, ConnectionFacts] = weakref.WeakKeyDictionary()

    def server(self) -> web.Server:
        limits = self.edge.limits
        # aiohttp's own parser limits sit above ours so that we, not it, answer 414/431 with a proper body.
        return web.Server(self.handle, access_log=None, keepalive_timeout=limits.idle_timeout_s,
                          max_line_size=limits.max_request_line_bytes * 2,
                          max_field_size=limits.max_header_bytes * 2, max_headers=limits.max_headers * 2)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        edge = self.edge
        head = RequestHead(
            method=request.method, target=request.raw_path,
            protocol=f"HTTP/{request.version.major}.{request.version.minor}",
            fields=[(name.decode("latin-1").lower(), value.decode("latin-1")) for name, value in request.raw_headers])
        exchange = edge.open(head, self._connection_facts(request.transport))
        if exchange.error is None and edge.websockets is not None and edge.websockets.wants(exchange.info):
            # Authorized like any request, and answered with a plain HTTP error before any upgrade if refused.
            outcome = await edge.websockets.handle(request, exchange)
            if isinstance(outcome, Response):
                return await self._write(request, outcome, exchange)
            edge.finish(exchange, outcome.status, exchange.bytes_out)
            return outcome
        body = self._body(request, exchange) if request.body_exists and exchange.error is None else None
        response = await edge.respond(exchange, body)
        return await self._write(request, response, exchange)

    def _connection_facts(self, transport: Any) -> ConnectionFacts:
        if transport is None:
            return connection_facts(None)
        ssl_object = transport.get_extra_info("ssl_object")
        # uvloop's TLS transport cannot be weakly referenced; its SSLObject (one per connection) can.
        key = ssl_object if ssl_object is not None else transport
        try:
            facts = self._facts.get(key)
        except TypeError:  # a transport without weakref support: work it out per request
            return connection_facts(transport)
        if facts is None:
            facts = self._facts[key] = connection_facts(transport)
        return facts

    async def _body(self, request: web.BaseRequest, exchange: Exchange) -> AsyncIterator[bytes]:
        if request.headers.get("expect", "").lower() == "100-continue" and request.writer is not None:
            # Sent only once the request was routed and authorized: the body is wanted.
            await request.writer.write(_CONTINUE)
        cap = self.edge.body_cap(exchange)
        async for chunk in request.content.iter_any():
            exchange.bytes_in += len(chunk)
            if exchange.bytes_in > cap:
                raise BodyTooLarge()
            yield chunk

    async def _write(self, request: web.BaseRequest, response: Response, exchange: Exchange) -> web.StreamResponse:
        out = web.StreamResponse(status=response.status)
        content_length = None
        for name, value in response.headers:
            if name == "content-length":
                content_length = value
            else:
                out.headers.add(name, value)
        body = response.body
        try:
            if isinstance(body, bytes):
                out.content_length = len(body)
                await out.prepare(request)
                await out.write(body)
                sent = len(body)
            else:
                if content_length is not None and content_length.isdigit():
                    out.content_length = int(content_length)
                await out.prepare(request)
                sent = 0
                async for chunk in body:
                    sent += len(chunk)
                    await out.write(chunk)
            await out.write_eof()
        except GatewayError as error:
            # Headers are gone already; all that is left is to cut the connection so the client sees a broken
            # response rather than a truncated one that looks whole.
            log.warning("response aborted: %s", error.detail or error.public_message)
            exchange.error = error
            if request.transport is not None:
                request.transport.close()
            sent = 0
        except (ConnectionResetError, HTTPException):
            sent = 0
        finally:
            if not isinstance(body, bytes):
                await body.aclose()  # type: ignore[attr-defined]
        self.edge.finish(exchange, response.status, sent)
        return out
