"""WebSocket proxying on the HTTP listener: authorize, dial the upstream, only then upgrade, then bridge.

Order matters: the request is routed and authorized like any other (`Pipeline.admit`), and the upstream's upgrade
must have succeeded (mTLS, SPIFFE ID checked) before the client's is accepted, so every refusal — policy, no
route, upstream identity, upstream saying no — is an ordinary HTTP response and never a socket that opens and
closes. Close codes travel end to end; the ones that cannot be sent on the wire (1005 no status, 1006 abnormal)
become 1000 and 1011.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp
from aiohttp import WSMsgType, web

from mesh_gateway.config import WebSocketSettings
from mesh_gateway.errors import BadRequest, GatewayError
from mesh_gateway.model import RequestInfo, Response
from mesh_gateway.pipeline import Exchange, Pipeline, denied_response, error_response
from mesh_gateway.upstream.websocket import WebSocketDialer

log = logging.getLogger("mesh_gateway.edge.websocket")

# The handshake is per hop: each side gets its own key, version and negotiated extensions.
_HANDSHAKE = frozenset({"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
                        "sec-websocket-protocol", "sec-websocket-accept"})
_UNSENDABLE = {1005: 1000, 1006: 1011}
GOING_AWAY = 1001
AnySocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


def close_code(code: int | None) -> int:
    if code is None:
        return 1000
    return _UNSENDABLE.get(code, code)


class WebSocketProxy:
    def __init__(self, pipeline: Pipeline, dialer: WebSocketDialer, settings: WebSocketSettings) -> None:
        self._pipeline = pipeline
        self._dialer = dialer
        self._settings = settings

    def wants(self, info: RequestInfo) -> bool:
        upgrade = (info.header("upgrade") or "").lower()
        connection = {t.strip().lower() for t in (info.header("connection") or "").split(",")}
        return info.method == "GET" and upgrade == "websocket" and "upgrade" in connection

    async def handle(self, request: web.BaseRequest, exchange: Exchange) -> web.StreamResponse | Response:
        info = exchange.info
        try:
            decision = await self._pipeline.admit(exchange)
            if not decision.allowed:
                return denied_response(decision, info.request_id)
            if not web.WebSocketResponse().can_prepare(request).ok:
                raise BadRequest("malformed WebSocket handshake", public_message="invalid WebSocket handshake")
            upstream = await self._dial(exchange, request)
        except GatewayError as error:
            exchange.error = error
            exchange.span.fail(error)
            return error_response(error, info.request_id)
        try:
            # Offer the client exactly what the upstream chose, so both hops speak the same subprotocol.
            downstream = web.WebSocketResponse(protocols=(upstream.protocol,) if upstream.protocol else (),
                                               max_msg_size=self._settings.max_message_bytes, autoping=True,
                                               autoclose=True, compress=False)
            await downstream.prepare(request)
            await self._bridge(downstream, upstream, exchange)
        finally:
            await upstream.close()
        return downstream

    async def _dial(self, exchange: Exchange, request: web.BaseRequest) -> aiohttp.ClientWebSocketResponse:
        info = exchange.info
        endpoint = exchange.endpoint
        assert endpoint is not None  # admitted
        headers = [(k, v) for k, v in self._pipeline.upstream_headers(exchange) if k not in _HANDSHAKE]
        headers.append(("host", info.host))
        protocols = [p.strip() for p in request.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
        span = self._pipeline.tracer.child(exchange.span, "upstream", client=True)
        span.set("server.address", endpoint.address)
        span.set("server.port", endpoint.port)
        if endpoint.spiffe_id is not None:
            span.set("mesh.upstream.spiffe_id", str(endpoint.spiffe_id))
        span.inject(headers)
        try:
            return await self._dialer.connect(endpoint, info.target, headers, protocols)
        except GatewayError as error:
            span.fail(error)
            raise
        finally:
            span.end()

    async def _bridge(self, downstream: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse,
                      exchange: Exchange) -> None:
        active = asyncio.Event()

        async def relay(source: AnySocket, sink: AnySocket, inbound: bool) -> None:
            reason, code = "", None
            while True:
                message = await source.receive()
                active.set()
                if message.type == WSMsgType.TEXT:
                    data = message.data.encode()
                    await sink.send_str(message.data)
                elif message.type == WSMsgType.BINARY:
                    data = message.data
                    await sink.send_bytes(message.data)
                else:  # CLOSE/CLOSING/CLOSED, or ERROR (oversized: aiohttp closed the offender with 1009)
                    if message.type == WSMsgType.CLOSE and isinstance(message.extra, str):
                        reason = message.extra
                    elif message.type == WSMsgType.ERROR:
                        code = getattr(message.data, "code", None)  # the code aiohttp closed the source with
                    break
                if inbound:
                    exchange.bytes_in += len(data)
                else:
                    exchange.bytes_out += len(data)
            await sink.close(code=close_code(code or source.close_code), message=reason.encode()[:123])

        async def idle() -> None:
            while True:
                try:
                    async with asyncio.timeout(self._settings.idle_timeout_s):
                        await active.wait()
                except TimeoutError:
                    break
                active.clear()
            for side in (downstream, upstream):
                await side.close(code=GOING_AWAY, message=b"idle timeout")

        tasks = [asyncio.ensure_future(relay(downstream, upstream, True)),
                 asyncio.ensure_future(relay(upstream, downstream, False)), asyncio.ensure_future(idle())]
        try:
            # Whichever side closes first, its close is passed on and the other relay then ends by itself.
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            await asyncio.wait(tasks[:2], timeout=5.0)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        exchange.span.set("websocket.close_code", close_code(downstream.close_code))

