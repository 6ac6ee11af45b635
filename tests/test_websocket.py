"""WebSocket through the gateway: authorized before the upgrade, bridged to an mTLS upstream, close codes kept."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from mesh_gateway.identity.tls import peer_spiffe_id, server_context
from tests.grpc_support import DenyMethods
from tests.support import CLIENT_ID, GATEWAY_ID, WEB_ID, client_ssl, gateway_config, issue, running, url


@dataclass
class WsUpstream:
    runner: web.BaseRunner
    port: int
    handshakes: list[dict[str, Any]] = field(default_factory=list)
    close_codes: list[int | None] = field(default_factory=list)


async def start_ws_upstream(creds: Any) -> WsUpstream:
    """A real aiohttp WebSocket echo service that requires mTLS from the mesh."""
    upstream: WsUpstream

    async def handle(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("chat.v1",))
        await ws.prepare(request)
        upstream.handshakes.append({"caller": str(peer_spiffe_id(request.transport.get_extra_info("ssl_object"))),
                                    "headers": {k.lower(): v for k, v in request.headers.items()},
                                    "path": request.path_qs, "protocol": ws.ws_protocol})
        async for message in ws:
            if message.type == WSMsgType.TEXT and message.data.startswith("close:"):
                await ws.close(code=int(message.data[6:]), message=b"upstream says bye")
            elif message.type == WSMsgType.TEXT:
                await ws.send_str(f"echo:{message.data}")
            elif message.type == WSMsgType.BINARY:
                await ws.send_bytes(message.data[::-1])
        upstream.close_codes.append(ws.close_code)
        return ws

    app = web.Application()
    app.router.add_get("/ws", handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    context = server_context(creds.cert_chain_pem, creds.key_pem, client_auth="required",
                             client_ca_pem=creds.bundle_pem)
    await web.SockSite(runner, sock, ssl_context=context).start()
    upstream = WsUpstream(runner, sock.getsockname()[1])
    return upstream


@pytest.fixture
async def ws_upstream(ca) -> AsyncIterator[WsUpstream]:
    upstream = await start_ws_upstream(issue(ca, WEB_ID))
    yield upstream
    await upstream.runner.cleanup()


def ws_config(ca_dir, upstream: WsUpstream, spiffe_id: str = WEB_ID, **extra: Any):
    return gateway_config(ca_dir, {"web": [{"address": "127.0.0.1", "port": upstream.port, "spiffe_id": spiffe_id}]},
                          **extra)


async def test_websocket_echo_through_gateway_with_gateway_identity(ca, ca_dir, ws_upstream, client_creds):
    async with running(ws_config(ca_dir, ws_upstream)) as gw, aiohttp.ClientSession() as client:
        async with client.ws_connect(url(gw, "/ws?room=1", scheme="wss"), ssl=client_ssl(ca.bundle_pem, client_creds),
                                     protocols=("chat.v2", "chat.v1")) as ws:
            await ws.send_str("hello")
            text = await ws.receive_str(timeout=10)
            await ws.send_bytes(b"\x01\x02\x03")
            binary = await ws.receive_bytes(timeout=10)
            protocol = ws.protocol
    assert (text, binary, protocol) == ("echo:hello", b"\x03\x02\x01", "chat.v1")
    handshake = ws_upstream.handshakes[0]
    assert handshake["caller"] == GATEWAY_ID
    assert handshake["path"] == "/ws?room=1"
    assert handshake["headers"]["x-forwarded-client-cert"] == f"By={GATEWAY_ID};URI={CLIENT_ID}"


async def test_client_close_code_reaches_upstream(ca, ca_dir, ws_upstream, client_creds):
    async with running(ws_config(ca_dir, ws_upstream)) as gw, aiohttp.ClientSession() as client:
        async with client.ws_connect(url(gw, "/ws", scheme="wss"), ssl=client_ssl(ca.bundle_pem, client_creds)) as ws:
            await ws.send_str("ping")
            assert await ws.receive_str(timeout=10) == "echo:ping"
            await ws.close(code=4000, message=b"client leaving")
        await _until(lambda: ws_upstream.close_codes)
    assert ws_upstream.close_codes == [4000]


async def test_upstream_close_code_and_reason_reach_client(ca, ca_dir, ws_upstream, client_creds):
    async with running(ws_config(ca_dir, ws_upstream)) as gw, aiohttp.ClientSession() as client:
        async with client.ws_connect(url(gw, "/ws", scheme="wss"), ssl=client_ssl(ca.bundle_pem, client_creds)) as ws:
            await ws.send_str("close:4001")
            message = await ws.receive(timeout=10)
    assert message.type == WSMsgType.CLOSE
    assert (message.data, message.extra) == (4001, "upstream says bye")


async def test_denied_upgrade_gets_403_and_upstream_sees_nothing(ca, ca_dir, ws_upstream, client_creds):
    async with running(ws_config(ca_dir, ws_upstream), authorizer=DenyMethods("/ws")) as gw, \
            aiohttp.ClientSession() as client:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect(url(gw, "/ws", scheme="wss"), ssl=client_ssl(ca.bundle_pem, client_creds))
        async with client.get(url(gw, "/ws"), ssl=client_ssl(ca.bundle_pem, client_creds),
                              headers={"upgrade": "websocket", "connection": "upgrade",
                                       "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
                                       "sec-websocket-version": "13"}) as plain:
            body = await plain.json()
    assert refused.value.status == 403
    assert plain.status == 403 and body["error"] == "forbidden"
    assert "upgrade" not in {k.lower() for k in plain.headers}
    assert ws_upstream.handshakes == []


async def test_upstream_with_wrong_identity_is_502_before_upgrade(ca, ca_dir, ws_upstream, client_creds):
    config = ws_config(ca_dir, ws_upstream, spiffe_id="spiffe://mesh.local/ns/default/sa/other")
    async with running(config) as gw, aiohttp.ClientSession() as client:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect(url(gw, "/ws", scheme="wss"), ssl=client_ssl(ca.bundle_pem, client_creds))
    assert refused.value.status == 502
    assert ws_upstream.handshakes == []


async def test_oversized_message_closes_with_1009(ca, ca_dir, ws_upstream, client_creds):
    config = ws_config(ca_dir, ws_upstream, protocols={"websocket": {"max_message_bytes": 1024}})
    async with running(config) as gw, aiohttp.ClientSession() as client:
        async with client.ws_connect(url(gw, "/ws", scheme="wss"), ssl=client_ssl(ca.bundle_pem, client_creds)) as ws:
            await ws.send_bytes(b"x" * 4096)
            message = await ws.receive(timeout=10)
        await _until(lambda: ws_upstream.close_codes)
    assert (message.type, message.data) == (WSMsgType.CLOSE, 1009)
    assert ws_upstream.close_codes == [1009]


async def test_idle_session_is_closed_as_going_away(ca, ca_dir, ws_upstream, client_creds):
    config = ws_config(ca_dir, ws_upstream, protocols={"websocket": {"idle_timeout_s": 0.3}})
    async with running(config) as gw, aiohttp.ClientSession() as client:
        async with client.ws_connect(url(gw, "/ws", scheme="wss"), ssl=client_ssl(ca.bundle_pem, client_creds)) as ws:
            message = await ws.receive(timeout=10)
        await _until(lambda: ws_upstream.close_codes)
    assert (message.type, message.data) == (WSMsgType.CLOSE, 1001)
    assert ws_upstream.close_codes == [1001]


async def _until(condition, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)
