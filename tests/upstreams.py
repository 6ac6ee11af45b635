"""Upstreams whose behaviour a test controls: a status to answer, a gate to hold requests, a connection reset."""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass, field

from aiohttp import web

from mesh_gateway.identity.tls import server_context
from mesh_gateway.model import Credentials


@dataclass
class Controlled:
    name: str
    status: int = 200
    hold: asyncio.Event | None = None
    hits: int = 0
    bodies: list[bytes] = field(default_factory=list)
    port: int = 0
    runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        self.bodies.append(await request.read())
        if self.hold is not None:
            await self.hold.wait()
        return web.Response(status=self.status, text=self.name, headers={"x-upstream": self.name})

    async def close(self) -> None:
        if self.hold is not None:
            self.hold.set()
        if self.runner is not None:
            await self.runner.cleanup()


async def start_controlled(name: str, creds: Credentials | None, *, status: int = 200,
                           hold: asyncio.Event | None = None) -> Controlled:
    """An mTLS upstream presenting `creds` (requiring the caller's certificate), or plain HTTP when None."""
    upstream = Controlled(name, status, hold)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", upstream.handle)
    upstream.runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await upstream.runner.setup()
    context = None if creds is None else server_context(creds.cert_chain_pem, creds.key_pem,
                                                        client_auth="required", client_ca_pem=creds.bundle_pem)
    site = web.TCPSite(upstream.runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    upstream.port = upstream.runner.addresses[0][1]
    return upstream


@dataclass
class Resetter:
    """Completes the mTLS handshake, reads the whole request (head and body), then resets the connection."""

    server: asyncio.Server
    port: int
    requests: list[bytes] = field(default_factory=list)

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()


async def start_resetter(creds: Credentials) -> Resetter:
    holder: list[Resetter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await reader.readexactly(length) if length else b""
        holder[0].requests.append(head + body)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    context = server_context(creds.cert_chain_pem, creds.key_pem, client_auth="required",
                             client_ca_pem=creds.bundle_pem)
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    resetter = Resetter(server, server.sockets[0].getsockname()[1])
    holder.append(resetter)
    return resetter
