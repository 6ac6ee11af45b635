"""One TLS port for HTTP/1.1 and HTTP/2: the protocol is chosen per connection by what ALPN negotiated."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from mesh_gateway.edges.h2 import H2Server


class AlpnSwitch(asyncio.Protocol):
    """Lives only until the TLS handshake is done, then swaps in the protocol ALPN chose."""

    def __init__(self, http1: Any, h2_server: H2Server) -> None:
        self._http1 = http1
        self._h2 = h2_server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        chosen = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        protocol: asyncio.BaseProtocol = self._h2.protocol() if chosen == "h2" else self._http1()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)


class AlpnSite(web.SockSite):
    """aiohttp's SockSite, with connections that negotiated `h2` served by an H2Server instead."""

    def __init__(self, runner: web.BaseRunner, sock: Any, *, ssl_context: Any, h2_server: H2Server,
                 drain_timeout_s: float) -> None:
        super().__init__(runner, sock, ssl_context=ssl_context)
        self.h2_server = h2_server
        self._drain_timeout_s = drain_timeout_s

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        http1 = self._runner.server
        assert http1 is not None
        self._server = await asyncio.get_running_loop().create_server(
            lambda: AlpnSwitch(http1, self.h2_server), sock=self._sock, ssl=self._ssl_context,
            backlog=self._backlog)

    async def stop(self) -> None:
        await super().stop()  # stop accepting
        await self.h2_server.shutdown(self._drain_timeout_s)
