"""One bound HTTP listener: HTTP/1.1 on the chosen server (`h1`, the default, or `aiohttp`), HTTP/2 through ALPN
on TLS listeners that offer it, WebSocket upgrades through aiohttp. Stops by draining all of them."""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Literal

from aiohttp import web

from mesh_gateway.config import Http2Settings
from mesh_gateway.edges.alpn import AlpnSite, AlpnSwitch
from mesh_gateway.edges.h1_server import H1Server
from mesh_gateway.edges.h2 import H2Server
from mesh_gateway.edges.http import HttpEdge
from mesh_gateway.edges.http_aiohttp import AiohttpEdge

Http1Server = Literal["h1", "aiohttp"]


class HttpListener:
    def __init__(self, edge: HttpEdge, *, server: Http1Server = "h1", ssl_context: ssl.SSLContext | None,
                 http2: Http2Settings | None = None, drain_timeout_s: float) -> None:
        self.edge = edge
        self._kind = server
        self._ssl_context = ssl_context
        self._drain_timeout_s = drain_timeout_s
        self.h2_server = H2Server(edge, http2) if http2 is not None and ssl_context is not None else None
        self._aiohttp = AiohttpEdge(edge)
        self._server: asyncio.AbstractServer | None = None
        self._h1: H1Server | None = None
        self._upgrades: web.Server | None = None
        self._runner: web.ServerRunner | None = None

    async def start(self, sock: socket.socket) -> None:
        """Serve on the bound `sock`; it is closed again if serving cannot start."""
        try:
            await self._start(sock)
        except BaseException:
            sock.close()
            raise

    async def _start(self, sock: socket.socket) -> None:
        if self._kind == "aiohttp":
            await self._start_aiohttp(sock)
            return
        if self.edge.websockets is not None:
            self._upgrades = self._aiohttp.server()
        h1 = self._h1 = H1Server(self.edge, upgrades=self._upgrades)
        h2 = self.h2_server
        factory = h1.protocol if h2 is None else (lambda: AlpnSwitch(h1.protocol, h2))
        self._server = await asyncio.get_running_loop().create_server(factory, sock=sock, ssl=self._ssl_context,
                                                                      backlog=1024)

    async def _start_aiohttp(self, sock: socket.socket) -> None:
        runner = self._runner = web.ServerRunner(self._aiohttp.server(), shutdown_timeout=self._drain_timeout_s)
        await runner.setup()
        site: web.BaseSite
        if self.h2_server is None:
            site = web.SockSite(runner, sock, ssl_context=self._ssl_context)
        else:
            assert self._ssl_context is not None
            site = AlpnSite(runner, sock, ssl_context=self._ssl_context, h2_server=self.h2_server,
                            drain_timeout_s=self._drain_timeout_s)
        await site.start()

    async def cleanup(self) -> None:
        """Stop accepting; let requests in flight finish within the drain timeout; close every connection."""
        if self._runner is not None:
            await self._runner.cleanup()
            return
        if self._server is not None:
            self._server.close()
        timeout = self._drain_timeout_s
        waits = [server.shutdown(timeout) for server in (self._h1, self.h2_server, self._upgrades)
                 if server is not None]
        await asyncio.gather(*waits)
