"""The HTTP edge core, shared by every codec on an HTTP listener: a parsed request head → `RequestInfo` under the
listener's limits → `Pipeline` → `Response`, and the books closed once per exchange.

Codecs: edges/h1_server.py (httptools on an asyncio Protocol, the default HTTP/1.1 server),
edges/http_aiohttp.py (aiohttp's low-level server, selectable, and the home of WebSocket upgrades), and
edges/h2.py (HTTP/2 via ALPN). None of their types reach this module or the pipeline.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

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

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger("mesh_gateway.edge")

CompletionHook = Callable[[Exchange], None]
RequestRewrite = Callable[[RequestInfo], RequestInfo]
"""Turns the request as received into the request as routed (e.g. the sidecar's `/<service>/...` addressing);
raises a GatewayError to refuse it."""


class WebSocketHandler(Protocol):
    """WebSocket sessions are served through aiohttp (edges/websocket.py); the h1 server hands them over."""

    def wants(self, info: RequestInfo) -> bool: ...
    async def handle(self, request: web.BaseRequest, exchange: Exchange) -> web.StreamResponse | Response: ...


# A client's request id is adopted only if it is short and plain: it ends up in logs and upstream headers.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Request ids: a random per-process prefix and a counter. Unique without a getrandom() syscall per request (uuid4
# was ~3 % of the gateway's CPU); a request id is a correlation token, not a secret.
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


def adopt_request_id(value: str | None) -> str:
    return value if value and _REQUEST_ID.fullmatch(value) else new_request_id()


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A request head as a codec parsed it: header names lower-cased, in wire order, no pseudo-headers."""

    method: str
    target: str
    """As sent: path, then `?query` if any."""
    protocol: str
    fields: list[tuple[str, str]]
    authority: str | None = None
    """HTTP/2 `:authority`; HTTP/1.1 has only the host header."""


@dataclass(frozen=True, slots=True)
class ConnectionFacts:
    """What the connection says about every request on it, worked out once per connection.

    The client certificate cannot change on a connection (TLS 1.3 has no renegotiation; post-handshake auth and
    1.2 renegotiation are never requested), so parsing it per request was pure cost. A certificate that does not
    carry exactly one SPIFFE ID is kept as the error every request on the connection is refused with."""

    peer: PeerCert | None = None
    peer_error: Unauthenticated | None = None
    client: tuple[str, int] | None = None
    local: tuple[str, int] | None = None
    sni: str | None = None


NO_FACTS = ConnectionFacts()


def connection_facts(transport: Any) -> ConnectionFacts:
    if transport is None:
        return NO_FACTS
    ssl_object = transport.get_extra_info("ssl_object")
    client = transport.get_extra_info("peername")
    local = transport.get_extra_info("sockname")
    peer, peer_error = None, None
    if ssl_object is not None:
        try:
            spiffe_id = peer_spiffe_id(ssl_object)
        except IdentityError as exc:
            peer_error = Unauthenticated(str(exc), public_message="client certificate must carry exactly one "
                                                                  "SPIFFE ID")
        else:
            if spiffe_id is not None:
                peer = PeerCert(spiffe_id, ssl_object.getpeercert(binary_form=True))
    return ConnectionFacts(peer, peer_error, client[:2] if client else None, local[:2] if local else None,
                           ssl_object.server_hostname if ssl_object is not None else None)


class HttpEdge:
    def __init__(self, *, name: str, pipeline: Pipeline, limits: Limits, tls: bool,
                 on_complete: list[CompletionHook] | None = None, rewrite: RequestRewrite | None = None) -> None:
        self.name = name
        self._rewrite = rewrite
        self._pipeline = pipeline
        self._limits = limits
        self._scheme = "https" if tls else "http"
        self.on_complete: list[CompletionHook] = on_complete if on_complete is not None else []
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

    def open(self, head: RequestHead, facts: ConnectionFacts) -> Exchange:
        """The exchange for a request head. A head that breaks a limit (414/431/413), an ambiguous path (400) or a
        refused client certificate (401) gives an exchange whose `error` is set: answer it with `refusal()`.
        It is still logged, counted and traced like any request."""
        size = 0
        host = head.authority
        length_text = request_id_text = None
        for name, value in head.fields:
            size += len(name) + len(value) + 4
            if name == "host":
                if host is None:
                    host = value
            elif name == "content-length":
                length_text = value
            elif name == "x-request-id":
                request_id_text = value
        request_id = adopt_request_id(request_id_text)
        tracer = self._pipeline.tracer
        try:
            info = self._request_info(head, facts, request_id, size, host or "", length_text)
            if self._rewrite is not None:
                info = self._rewrite(info)
        except GatewayError as error:
            client = facts.client
            rejected = Exchange(RequestInfo(
                method=head.method[:16], path=head.target.partition("?")[0][:256], query="",
                host=(host or "")[:256], scheme=self._scheme, headers=(),
                client_address=client[0] if client else "", client_port=client[1] if client else 0,
                request_id=request_id, protocol=head.protocol, listener=self.name), error=error)
            rejected.span = tracer.ingress(rejected.info)
            rejected.span.fail(error)
            return rejected
        return Exchange(info, span=tracer.ingress(info))

    def _request_info(self, head: RequestHead, facts: ConnectionFacts, request_id: str, size: int, host: str,
                      length_text: str | None) -> RequestInfo:
        limits = self._limits
        target = head.target
        if len(target) + len(head.method) + 12 > limits.max_request_line_bytes:
            raise UriTooLong(f"request target of {len(target)} bytes")
        if len(head.fields) > limits.max_headers:
            raise HeadersTooLarge(f"{len(head.fields)} header fields")
        if size > limits.max_header_bytes:
            raise HeadersTooLarge(f"{size} bytes of headers")
        if facts.peer_error is not None:
            raise facts.peer_error
        content_length = int(length_text) if length_text is not None and length_text.isdigit() else None
        if content_length is not None and content_length > limits.max_body_bytes:
            raise PayloadTooLarge(f"declared body of {content_length} bytes")
        raw, _, query = target.partition("?")
        try:
            # One path for routing, policy and upstream: see mesh_gateway/paths.py.
            path = normalise_path(raw).path
        except UnsafePath as exc:
            raise BadRequest(str(exc), public_message="ambiguous request path") from None
        client, local = facts.client, facts.local
        return RequestInfo(
            method=head.method, path=path, query=query, host=host, scheme=self._scheme,
            headers=tuple(head.fields),
            client_address=client[0] if client else "", client_port=client[1] if client else 0,
            request_id=request_id, protocol=head.protocol, listener=self.name,
            local_address=local[0] if local else "", local_port=local[1] if local else 0,
            peer=facts.peer, sni=facts.sni, content_length=content_length,
        )

    async def respond(self, exchange: Exchange, body: Any) -> Response:
        """The response for an opened exchange: its refusal, or what the pipeline answers. Never raises."""
        if exchange.error is not None:
            return error_response(exchange.error, exchange.info.request_id)
        try:
            return await self._pipeline.handle(exchange, body)
        except Exception as exc:
            exchange.error = as_gateway_error(exc)
            exchange.span.fail(exchange.error)
            return internal_error(exc, exchange.info.request_id)

    def body_cap(self, exchange: Exchange) -> int:
        """The most request body bytes this exchange may stream: the route's cap within the listener's."""
        cap = self._limits.max_body_bytes
        route = exchange.route
        return min(route.policy.max_body_bytes, cap) if route is not None else cap

    def finish(self, exchange: Exchange, status: int, sent: int) -> None:
        """Close the books on one exchange (any codec on this listener: HTTP/1.1, HTTP/2, WebSocket)."""
        exchange.status = status
        exchange.bytes_out = sent
        span = exchange.span
        if span.recording:
            span.set("http.response.status_code", status)
        span.end()
        for hook in self.on_complete:
            try:
                hook(exchange)
            except Exception:  # a broken log sink must not break requests
                log.exception("completion hook failed")


def internal_error(exc: BaseException, request_id: str) -> Response:
    log.error("unexpected error handling request %s", request_id, exc_info=exc)
    return error_response(as_gateway_error(exc), request_id)
