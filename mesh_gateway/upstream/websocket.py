"""WebSocket upgrades to upstreams over mTLS, with the same SPIFFE check per connection as HTTP.

Upgraded connections never return to a pool and live for minutes, so they get their own session (unlimited, not
shared with HttpForwarder's keep-alive pool, where they would count against `pool_size`); the TLS contexts are
HttpForwarder's, keyed by expected SPIFFE ID and credentials version.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import aiohttp
from yarl import URL

from mesh_gateway.config import WebSocketSettings
from mesh_gateway.errors import GatewayError, UpstreamTimeout
from mesh_gateway.model import Endpoint
from mesh_gateway.upstream.http import HttpForwarder, SpiffeConnector, translate_client_error


class UpstreamRefusedUpgrade(GatewayError):
    status, grpc_code, public_message = 502, "UNAVAILABLE", "upstream refused the WebSocket upgrade"


class WebSocketDialer:
    def __init__(self, forwarder: HttpForwarder, settings: WebSocketSettings) -> None:
        self._forwarder = forwarder
        self._settings = settings
        self._session: aiohttp.ClientSession | None = None

    def _session_for_loop(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=SpiffeConnector(limit=0, limit_per_host=0, force_close=True),
                auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def connect(self, endpoint: Endpoint, target: str, headers: Sequence[tuple[str, str]],
                      protocols: Sequence[str]) -> aiohttp.ClientWebSocketResponse:
        """Upgrade to `endpoint`; raises GatewayError (identity mismatch, refused, timeout) before any message."""
        ssl_context = self._forwarder.ssl_context_for(endpoint)
        scheme = "ws" if ssl_context is False else "wss"
        url = URL(f"{scheme}://{endpoint.authority}{target}", encoded=True)
        settings = self._settings
        try:
            async with asyncio.timeout(settings.connect_timeout_s):
                return await self._session_for_loop().ws_connect(
                    url, ssl=ssl_context, headers=list(headers), protocols=tuple(protocols),
                    max_msg_size=settings.max_message_bytes, autoping=True, autoclose=True, compress=0,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0))
        except GatewayError:
            raise
        except TimeoutError:
            raise UpstreamTimeout(f"{endpoint.key}: no WebSocket upgrade within {settings.connect_timeout_s}s"
                                  ) from None
        except aiohttp.WSServerHandshakeError as exc:
            raise UpstreamRefusedUpgrade(f"{endpoint.key}: upgrade answered {exc.status}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise translate_client_error(exc, endpoint) from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
