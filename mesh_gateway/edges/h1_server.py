"""HTTP/1.1 at the edge: httptools (llhttp) on asyncio Protocols, each request → `RequestHead` → the edge core.

The default HTTP/1.1 server (`listeners[].server: h1`): keep-alive, pipelining, streamed bodies with backpressure,
100-continue after admission, framing chosen here, heads over twice the limits refused before they complete,
WebSocket upgrades handed with the connection to aiohttp, other upgrades ignored. docs/protocols.md has the rules.
H1Server owns a listener's connections (for drain); edges/h1_connection.py is one connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from mesh_gateway.edges.h1_connection import H1Connection
from mesh_gateway.edges.http import HttpEdge


class H1Server:
    """Owns one listener's HTTP/1.1 connections, so shutdown can drain them."""

    def __init__(self, edge: HttpEdge, *, upgrades: Callable[[], asyncio.Protocol] | None = None) -> None:
        self.edge = edge
        self.upgrades = upgrades
        """Makes the protocol a WebSocket upgrade is handed to (aiohttp's request handler); None: not served."""
        self.connections: set[H1Connection] = set()
        self.draining = False
        self._all_closed = asyncio.Event()

    def protocol(self) -> H1Connection:
        return H1Connection(self)

    def forget(self, connection: H1Connection) -> None:
        self.connections.discard(connection)
        if self.draining and not self.connections:
            self._all_closed.set()

    async def shutdown(self, timeout_s: float) -> None:
        """Close idle connections now, the others after the response in flight; cut what is left at the deadline."""
        self.draining = True
        for connection in list(self.connections):
            connection.drain()
        if self.connections:
            try:
                async with asyncio.timeout(timeout_s):
                    await self._all_closed.wait()
            except TimeoutError:
                for connection in list(self.connections):
                    connection.abort()
