"""The HTTP edge: aiohttp's low-level server in, `RequestInfo` + body stream to the pipeline, `Response` out.

The pipeline never sees aiohttp types; this module is the whole HTTP/1.1 codec seam.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web
from aiohttp.web_exceptions import HTTPException

from mesh_gateway.config import Limits
from mesh_gateway.errors import (
    BadRequest,
    GatewayError,
    HeadersTooLarge,
    PayloadTooLarge,
    Unauthenticated,
    UriTooLong,
    as_gateway_error,
)
from mesh_gateway.identity.tls import peer_spiffe_id
from mesh_gateway.model import PeerCert, RequestInfo, Response
from mesh_gateway.paths import UnsafePath, normalise_path
from mesh_gateway.pipeline import Exchange, Pipeline, error_response
from mesh_gateway.spiffe import IdentityError
from mesh_gateway.upstream.http import BodyTooLarge

log = logging.getLogger("mesh_gateway.edge")

CompletionHook = Callable[[Exchange], None]
RequestRewrite = Callable[[RequestInfo], RequestInfo]
"""Turns the request as received into the request as routed (e.g. the sidecar's `/<service>/...` addressing);
raises a GatewayError to refuse it."""


class WebSocketHandler(Protocol):
    def wants(self, info: RequestInfo) -> bool: ...
    async def handle(self, request: web.BaseRequest, exchange: Exchange) -> web.StreamResponse | Response: ...

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# A client's request id is adopted only if it is short and plain: it ends up in logs and upstream headers.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@dataclass(frozen=True, slots=True)
class _ConnectionFacts:
    peer: PeerCert | None
    client: tuple[str, int] | None
    local: tuple[str, int] | None
    sni: str | None


_NO_FACTS = _ConnectionFacts(None, None, None, None)
# Request ids: a random per-process prefix and a counter. Unique without a getrandom() syscall per request (uuid4
# was ~3 % of the gateway's CPU); a request id is a correlation token, not a secret.
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


class HttpEdge:
    def __init__(self, *, name: str, pipeline: Pipeline, limits: Limits, tls: bool,
                 on_complete: list[CompletionHook] | None = None, rewrite: RequestRewrite | None = None) -> None:
        self.name = name
        self._rewrite = rewrite
        self._pipeline = pipeline
        self._limits = limits
        self._scheme = "https" if tls else "http"
        self.on_complete: list[CompletionHook] = on_complete if on_complete is not None else []
        # Keyed by the transport, so an entry goes away with its connection.
        self._facts: weakref.WeakKeyDictionary[Any, _ConnectionFacts] = weakref.WeakKeyDictionary()
        self.websockets: WebSocketHandler | None = None
        """Set by app.py when WebSocket proxying is enabled (edges/websocket.py)."""

    @property
    def pipeline(self) -> Pipeline:
        return self._pipeline

    @property
    def limits(self) -> Limits:
        return self._limits

    @property
    def scheme(self) -> str:
        return self._scheme

    def server(self) -> web.Server:
        limits = self._limits
        # aiohttp's own parser limits sit above ours so that we, not it, answer 414/431 with a proper body.
        return web.Server(self.handle, access_log=None, keepalive_timeout=limits.idle_timeout_s,
                          max_line_size=limits.max_request_line_bytes * 2,
                          max_field_size=limits.max_header_bytes * 2, max_headers=limits.max_headers * 2)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        request_id = adopt_request_id(request.headers.get("x-request-id"))
        try:
            info = self._request_info(request, request_id)
            if self._rewrite is not None:
                info = self._rewrite(info)
        except GatewayError as error:
            # Refused before the request was fully read (414/431/413/401): still logged, counted and traced.
            rejected = Exchange(self._rejected_info(request, request_id), error=error)
            rejected.span = self._pipeline.tracer.ingress(rejected.info)
            rejected.span.fail(error)
            return await self._write(request, error_response(error, request_id), rejected)
        exchange = Exchange(info, span=self._pipeline.tracer.ingress(info))
        if self.websockets is not None and self.websockets.wants(info):
            # Authorized like any request, and answered with a plain HTTP error before any upgrade if refused.
            outcome = await self.websockets.handle(request, exchange)
            if isinstance(outcome, Response):
                return await self._write(request, outcome, exchange)
            self.finish(exchange, outcome.status, exchange.bytes_out)
            return outcome
        body = self._body(request, exchange) if request.body_exists else None
        try:
            response = await self._pipeline.handle(exchange, body)
        except Exception as exc:
            response = internal_error(exc, request_id)
            exchange.error = as_gateway_error(exc)
            exchange.span.fail(exchange.error)
        return await self._write(request, response, exchange)

    def _request_info(self, request: web.BaseRequest, request_id: str) -> RequestInfo:
        limits = self._limits
        raw_path = request.raw_path
        if len(raw_path) + len(request.method) + 12 > limits.max_request_line_bytes:
            raise UriTooLong(f"request target of {len(raw_path)} bytes")
        raw_headers = request.raw_headers
        if len(raw_headers) > limits.max_headers:
            raise HeadersTooLarge(f"{len(raw_headers)} header fields")
        size = 0
        headers = []
        for name, value in raw_headers:
            size += len(name) + len(value) + 4
            headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))
        if size > limits.max_header_bytes:
            raise HeadersTooLarge(f"{size} bytes of headers")
        raw, _, query = raw_path.partition("?")
        try:
            # One path for routing, policy and upstream: see mesh_gateway/paths.py.
            path = normalise_path(raw).path
        except UnsafePath as exc:
            raise BadRequest(str(exc), public_message="ambiguous request path") from None
        facts = self._connection_facts(request.transport)
        peer, client, local, sni = facts.peer, facts.client, facts.local, facts.sni
        content_length = request.content_length
        if content_length is not None and content_length > limits.max_body_bytes:
            raise PayloadTooLarge(f"declared body of {content_length} bytes")
        return RequestInfo(
            method=request.method,
            path=path,
            query=query,
            host=request.headers.get("host", ""),
            scheme=self._scheme,
            headers=tuple(headers),
            client_address=client[0] if client else "",
            client_port=client[1] if client else 0,
            request_id=request_id,
            protocol=f"HTTP/{request.version.major}.{request.version.minor}",
            listener=self.name,
            local_address=local[0] if local else "",
            local_port=local[1] if local else 0,
            peer=peer,
            sni=sni,
            content_length=content_length,
        )

    def _connection_facts(self, transport: Any) -> _ConnectionFacts:
        """What the connection says about every request on it, worked out once per connection.

        The client certificate cannot change on a connection (TLS 1.3 has no renegotiation; post-handshake auth
        and 1.2 renegotiation are never requested), so parsing it per request was pure cost.
        """
        if transport is None:
            return _NO_FACTS
        ssl_object = transport.get_extra_info("ssl_object")
        # uvloop's TLS transport cannot be weakly referenced; its SSLObject (one per connection) can.
        key = ssl_object if ssl_object is not None else transport
        try:
            facts = self._facts.get(key)
        except TypeError:  # a transport without weakref support: work it out per request
            key, facts = None, None
        if facts is None:
            peer = transport_peer(transport)  # an Unauthenticated error is not cached: the request fails
            client = transport.get_extra_info("peername")
            local = transport.get_extra_info("sockname")
            facts = _ConnectionFacts(peer, client[:2] if client else None, local[:2] if local else None,
                                     ssl_object.server_hostname if ssl_object is not None else None)
            if key is not None:
                self._facts[key] = facts
        return facts

    def _rejected_info(self, request: web.BaseRequest, request_id: str) -> RequestInfo:
        """What may safely be kept of a request that broke a limit: no headers, a bounded path, no query."""
        transport = request.transport
        client = transport.get_extra_info("peername") if transport else None
        return RequestInfo(
            method=request.method[:16], path=request.raw_path.partition("?")[0][:256], query="",
            host=request.headers.get("host", "")[:256], scheme=self._scheme, headers=(),
            client_address=client[0] if client else "", client_port=client[1] if client else 0,
            request_id=request_id, protocol=f"HTTP/{request.version.major}.{request.version.minor}",
            listener=self.name)


    async def _body(self, request: web.BaseRequest, exchange: Exchange) -> AsyncIterator[bytes]:
        if request.headers.get("expect", "").lower() == "100-continue" and request.writer is not None:
            # Sent only once the request was routed and authorized: the body is wanted.
            await request.writer.write(_CONTINUE)
        cap = (exchange.route.policy.max_body_bytes if exchange.route else self._limits.max_body_bytes)
        cap = min(cap, self._limits.max_body_bytes)
        async for chunk in request.content.iter_any():
            exchange.bytes_in += len(chunk)
            if exchange.bytes_in > cap:
                raise BodyTooLarge()
            yield chunk

    async def _write(self, request: web.BaseRequest, response: Response,
                     exchange: Exchange | None) -> web.StreamResponse:
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
            if exchange is not None:
                exchange.error = error
            if request.transport is not None:
                request.transport.close()
            sent = 0
        except (ConnectionResetError, HTTPException):
            sent = 0
        finally:
            if not isinstance(body, bytes):
                await body.aclose()  # type: ignore[attr-defined]
        if exchange is not None:
            self.finish(exchange, response.status, sent)
        return out

    def finish(self, exchange: Exchange, status: int, sent: int) -> None:
        """Close the books on one exchange (any edge sharing this listener: HTTP/1.1, HTTP/2, WebSocket)."""
        exchange.status = status
        exchange.bytes_out = sent
        exchange.span.set("http.response.status_code", status)
        exchange.span.end()
        for hook in self.on_complete:
            try:
                hook(exchange)
            except Exception:  # a broken log sink must not break requests
                log.exception("completion hook failed")


def adopt_request_id(value: str | None) -> str:
    return value if value and _REQUEST_ID.fullmatch(value) else new_request_id()


def transport_peer(transport: Any) -> PeerCert | None:
    """The client's SPIFFE ID from the TLS transport; Unauthenticated for a certificate without exactly one."""
    ssl_object = transport.get_extra_info("ssl_object") if transport else None
    if ssl_object is None:
        return None
    try:
        spiffe_id = peer_spiffe_id(ssl_object)
    except IdentityError as exc:
        raise Unauthenticated(str(exc), public_message="client certificate must carry exactly one SPIFFE ID"
                              ) from None
    if spiffe_id is None:
        return None
    return PeerCert(spiffe_id, ssl_object.getpeercert(binary_form=True))


def internal_error(exc: BaseException, request_id: str) -> Response:
    log.error("unexpected error handling request %s", request_id, exc_info=exc)
    return error_response(as_gateway_error(exc), request_id)
