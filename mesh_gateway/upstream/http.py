"""HTTP/1.1 forwarder over aiohttp: keep-alive pools, mTLS with the gateway's SVID, SPIFFE ID checked per connection.

Pools are keyed by aiohttp on (host, port, SSLContext); we hand it one context per (expected SPIFFE ID,
credentials version), so a connection verified for one identity is never reused for another, and a rotated
SVID starts new connections while old ones finish.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp.client_proto import ResponseHandler
from multidict import CIMultiDict
from yarl import URL

from mesh_gateway.errors import (
    GatewayError,
    PayloadTooLarge,
    UpstreamConnectFailed,
    UpstreamIdentityMismatch,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from mesh_gateway.identity.tls import UpstreamContext, UpstreamContexts, verify_peer
from mesh_gateway.model import Credentials, Endpoint, Response, Route
from mesh_gateway.pipeline import Exchange, UpstreamRequest
from mesh_gateway.spiffe import IdentityError
from mesh_gateway.watch import Watch

log = logging.getLogger("mesh_gateway.upstream")

_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
CHUNK = 64 * 1024


class SpiffeConnector(aiohttp.TCPConnector):
    """Checks the upstream's SPIFFE ID right after the handshake, before a byte of the request is sent."""

    async def _create_connection(self, req: Any, traces: Any, timeout: Any) -> ResponseHandler:
        protocol = await super()._create_connection(req, traces, timeout)
        context = req.ssl
        if isinstance(context, UpstreamContext) and context.expected_spiffe_id is not None:
            transport = protocol.transport
            ssl_object = transport.get_extra_info("ssl_object") if transport else None
            try:
                verify_peer(ssl_object, context.expected_spiffe_id)
            except IdentityError as exc:
                protocol.close()
                raise UpstreamIdentityMismatch(str(exc)) from None
        return protocol


class BodyTooLarge(PayloadTooLarge):
    """Raised inside the request body stream; a PayloadTooLarge (413) wherever it surfaces, including while the
    pipeline buffers a body prefix for a policy."""


class HttpForwarder:
    def __init__(self, credentials: Watch[Credentials], *, pool_size: int = 256, keepalive_s: float = 30.0) -> None:
        self._contexts = UpstreamContexts(credentials)
        self._pool_size = pool_size
        self._keepalive_s = keepalive_s
        self._session: aiohttp.ClientSession | None = None

    def _session_for_loop(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = SpiffeConnector(limit=0, limit_per_host=self._pool_size,
                                        keepalive_timeout=self._keepalive_s, enable_cleanup_closed=False)
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                                  skip_auto_headers=_SKIP_AUTO_HEADERS,
                                                  cookie_jar=aiohttp.DummyCookieJar())
            # Retries belong to upstream/retry.py (another endpoint, the route's budget, body replay rules);
            # aiohttp's own silent resend of idempotent requests to the same endpoint would double them.
            self._session._retry_connection = False
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def ssl_context_for(self, endpoint: Endpoint) -> UpstreamContext | bool:
        """The TLS context for `endpoint` (False for plain); shared with the WebSocket dialer."""
        return self._contexts.for_endpoint(endpoint) or False

    async def forward(self, request: UpstreamRequest, endpoint: Endpoint, route: Route,
                      exchange: Exchange) -> Response:
        ssl_context = self.ssl_context_for(endpoint)
        scheme = "http" if ssl_context is False else "https"
        url = URL(f"{scheme}://{endpoint.authority}{request.target}", encoded=True)
        headers = CIMultiDict(request.headers)
        headers["Host"] = request.host
        if exchange.info.content_length is not None:
            headers["Content-Length"] = str(exchange.info.content_length)
        policy = route.policy
        timeout = aiohttp.ClientTimeout(total=None, connect=policy.connect_timeout_s,
                                        sock_read=policy.idle_timeout_s)
        session = self._session_for_loop()
        try:
            async with asyncio.timeout(policy.timeout_s):
                upstream = await session.request(
                    request.method, url, headers=headers, data=request.body, ssl=ssl_context,
                    allow_redirects=False, timeout=timeout, compress=None, chunked=None,
                )
        except GatewayError:
            raise
        except BodyTooLarge:
            raise PayloadTooLarge("request body over the cap") from None
        except aiohttp.ConnectionTimeoutError:
            raise UpstreamConnectFailed(f"{endpoint.key}: connect timed out") from None
        except TimeoutError:
            raise UpstreamTimeout(f"no response from {endpoint.key} within {policy.timeout_s}s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise translate_client_error(exc, endpoint) from None
        response_headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in upstream.raw_headers]
        return Response(upstream.status, response_headers, _stream(upstream), endpoint.key)


def translate_client_error(exc: aiohttp.ClientError | OSError, endpoint: Endpoint) -> GatewayError:
    """An aiohttp client failure as the gateway error it means: ours if we raised it inside aiohttp (identity
    mismatch, body cap), else connect failed (nothing sent, safe to retry) or unavailable."""
    cause = gateway_cause(exc)
    if isinstance(cause, GatewayError):
        return cause
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamConnectFailed(f"{endpoint.key}: {type(exc).__name__}: {exc}")
    return UpstreamUnavailable(f"{endpoint.key}: {type(exc).__name__}: {exc}")


def gateway_cause(exc: BaseException) -> BaseException | None:
    seen = exc.__cause__ or exc.__context__
    while seen is not None:
        if isinstance(seen, GatewayError | BodyTooLarge):
            return PayloadTooLarge("request body over the cap") if isinstance(seen, BodyTooLarge) else seen
        seen = seen.__cause__ or seen.__context__
    return None


async def _stream(upstream: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    complete = False
    try:
        async for chunk in upstream.content.iter_chunked(CHUNK):
            yield chunk
        complete = True
    except TimeoutError:
        raise UpstreamTimeout("upstream went idle mid-body") from None
    except aiohttp.ClientError as exc:
        raise UpstreamUnavailable(f"upstream broke the response body: {exc}") from None
    finally:
        # A half-read response leaves the connection mid-message: it must not go back to the pool.
        if complete:
            upstream.release()
        else:
            upstream.close()
