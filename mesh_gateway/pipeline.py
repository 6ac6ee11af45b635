"""The life of a request: route → authorize → pick → forward, traced. Knows only the Protocols declared here."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from mesh_gateway import headers as hdrs
from mesh_gateway.balancer import RoundRobin
from mesh_gateway.errors import Forbidden, GatewayError
from mesh_gateway.model import (
    ALLOW_UNCHECKED,
    Body,
    BodyPrefix,
    Catalog,
    Decision,
    Endpoint,
    RequestInfo,
    Response,
    Route,
    SpiffeId,
)
from mesh_gateway.routing import CompiledRoutes
from mesh_gateway.watch import Watch

AttributeValue = str | int | float | bool


class Span(Protocol):
    """A tracing span as the pipeline sees it; telemetry/tracing.py implements it over OpenTelemetry."""

    @property
    def trace_id(self) -> str: ...
    @property
    def span_id(self) -> str: ...
    @property
    def recording(self) -> bool:
        """False when set() and rename() are dropped anyway (not sampled): callers may skip building values."""
        ...
    def set(self, key: str, value: AttributeValue) -> None: ...
    def rename(self, name: str) -> None: ...
    def fail(self, error: GatewayError) -> None: ...
    def inject(self, headers: list[tuple[str, str]]) -> None: ...
    def end(self) -> None: ...


class Tracer(Protocol):
    def ingress(self, info: RequestInfo) -> Span: ...
    def child(self, parent: Span, name: str, *, client: bool = False) -> Span: ...


class NoSpan:
    trace_id = ""
    span_id = ""
    recording = False

    def set(self, key: str, value: AttributeValue) -> None:
        pass

    def rename(self, name: str) -> None:
        pass

    def fail(self, error: GatewayError) -> None:
        pass

    def inject(self, headers: list[tuple[str, str]]) -> None:
        pass

    def end(self) -> None:
        pass


NO_SPAN = NoSpan()


class NoTracer:
    def ingress(self, info: RequestInfo) -> Span:
        return NO_SPAN

    def child(self, parent: Span, name: str, *, client: bool = False) -> Span:
        return NO_SPAN


@dataclass(slots=True)
class Exchange:
    """One request's mutable record: filled by the pipeline, finished by the edge, read by logs and metrics."""

    info: RequestInfo
    span: Span = NO_SPAN
    started: float = field(default_factory=time.perf_counter)
    route: Route | None = None
    decision: Decision | None = None
    endpoint: Endpoint | None = None
    status: int = 0
    error: GatewayError | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    retries: int = 0


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: Body | None
    host: str


class Authorizer(Protocol):
    async def check(self, info: RequestInfo, route: Route, exchange: Exchange,
                    body: BodyPrefix | None = None) -> Decision:
        """Return the decision; raise a GatewayError (e.g. AuthzUnavailable) when no decision could be made.

        `body` is given only for routes with `authz_include_body_bytes` set."""
        ...


class Forwarder(Protocol):
    async def forward(self, request: UpstreamRequest, endpoint: Endpoint, route: Route,
                      exchange: Exchange) -> Response: ...


class EndpointPicker(Protocol):
    def pick(self, route: Route, catalog: Catalog, exchange: Exchange) -> Endpoint: ...


class RoundRobinPicker:
    def __init__(self) -> None:
        self._balancer = RoundRobin()

    def pick(self, route: Route, catalog: Catalog, exchange: Exchange) -> Endpoint:
        return self._balancer.pick(catalog.get(route.service))


class AllowAll:
    """Used only when no authorizer is configured; app.py logs that authorization is off."""

    async def check(self, info: RequestInfo, route: Route, exchange: Exchange,
                    body: BodyPrefix | None = None) -> Decision:
        return ALLOW_UNCHECKED


async def buffer_prefix(body: Body | None, limit: int) -> tuple[BodyPrefix, Body | None]:
    """Read up to `limit` bytes of the body for the policy; the returned stream replays them, then the rest."""
    if body is None:
        return BodyPrefix(b"", truncated=False), None
    iterator = body.__aiter__()
    chunks: list[bytes] = []
    size = 0
    ended = False
    while size <= limit:
        try:
            chunk = await iterator.__anext__()
        except StopAsyncIteration:
            ended = True
            break
        chunks.append(chunk)
        size += len(chunk)
    data = b"".join(chunks)

    async def replay() -> AsyncIterator[bytes]:
        if data:
            yield data
        if not ended:
            async for rest in iterator:
                yield rest

    return BodyPrefix(data[:limit], truncated=not ended), replay()


def error_response(error: GatewayError, request_id: str) -> Response:
    body = json.dumps({"error": error.public_message, "request_id": request_id}).encode()
    return Response(error.status, [("content-type", "application/json")], body)


def denied_response(decision: Decision, request_id: str) -> Response:
    status = decision.http_status or Forbidden.status
    headers = list(decision.response_headers_to_add)
    if decision.body is not None:
        return Response(status, [*headers, ("content-type", "text/plain; charset=utf-8")], decision.body.encode())
    body = json.dumps({"error": Forbidden.public_message, "request_id": request_id}).encode()
    return Response(status, [*headers, ("content-type", "application/json")], body)


class Pipeline:
    def __init__(self, *, routes: Watch[CompiledRoutes], catalog: Watch[Catalog], authorizer: Authorizer,
                 forwarder: Forwarder, gateway_id: Callable[[], SpiffeId], tracer: Tracer | None = None,
                 picker: EndpointPicker | None = None) -> None:
        self._routes = routes
        self._catalog = catalog
        self._authorizer = authorizer
        self._forwarder = forwarder
        self._gateway_id = gateway_id
        self.tracer: Tracer = tracer or NoTracer()
        self._picker = picker or RoundRobinPicker()

    async def handle(self, exchange: Exchange, body: Body | None) -> Response:
        """Never raises a GatewayError: it becomes the response, recorded on the exchange and span."""
        info = exchange.info
        try:
            route = self.route(exchange)
            if route.policy.authz_enabled and route.policy.authz_include_body_bytes:
                prefix, body = await buffer_prefix(body, route.policy.authz_include_body_bytes)
            else:
                prefix = None
            decision = await self.admit(exchange, prefix)
            if not decision.allowed:
                return denied_response(decision, info.request_id)
            endpoint = exchange.endpoint
            assert endpoint is not None  # set by admit() on allow
            request = UpstreamRequest(
                method=info.method,
                target=info.target,
                headers=self.upstream_headers(exchange),
                body=body,
                host=info.host,
            )
            response = await self._forward(request, endpoint, route, exchange)
            response.headers = hdrs.downstream_response_headers(response.headers,
                                                                add=decision.response_headers_to_add)
            return response
        except GatewayError as error:
            exchange.error = error
            exchange.span.fail(error)
            return error_response(error, info.request_id)

    def route(self, exchange: Exchange) -> Route:
        """Match the request to a route (NotFound otherwise) and name the span after it."""
        info = exchange.info
        route = exchange.route = self._routes.get().match(info)
        if exchange.span.recording:
            exchange.span.rename(f"{info.method} {route.name}")
            exchange.span.set("http.route", route.name)
        return route

    async def admit(self, exchange: Exchange, prefix: BodyPrefix | None = None) -> Decision:
        """Route (unless already routed) and authorize; on allow also pick the endpoint. Raises GatewayError.

        Shared by every edge: HTTP requests continue in handle(); gRPC calls and WebSocket sessions, which are
        not request/response shaped, take the admitted route and endpoint to their own forwarders.
        """
        route = exchange.route or self.route(exchange)
        decision = exchange.decision = await self._authorize(exchange.info, route, exchange, prefix)
        if decision.allowed:
            exchange.endpoint = self._picker.pick(route, self._catalog.get(), exchange)
        return decision

    def upstream_headers(self, exchange: Exchange) -> list[tuple[str, str]]:
        """Headers (or gRPC metadata) for the upstream, after the admitted decision's additions and removals."""
        decision = exchange.decision
        return hdrs.upstream_request_headers(exchange.info, self._gateway_id(),
                                             add=decision.headers if decision else (),
                                             remove=decision.request_headers_to_remove if decision else ())

    async def _authorize(self, info: RequestInfo, route: Route, exchange: Exchange,
                         prefix: BodyPrefix | None) -> Decision:
        if not route.policy.authz_enabled:
            return ALLOW_UNCHECKED
        span = self.tracer.child(exchange.span, "authz")
        try:
            decision = await (self._authorizer.check(info, route, exchange, prefix) if prefix is not None
                              else self._authorizer.check(info, route, exchange))
            if span.recording:
                span.set("mesh.authz.allowed", decision.allowed)
                span.set("mesh.authz.decision_id", decision.decision_id)
                span.set("mesh.authz.policy_revision", decision.policy_revision)
                span.set("mesh.authz.engine", decision.engine)
            return decision
        except GatewayError as error:
            span.fail(error)
            raise
        finally:
            span.end()

    async def _forward(self, request: UpstreamRequest, endpoint: Endpoint, route: Route,
                       exchange: Exchange) -> Response:
        span = self.tracer.child(exchange.span, "upstream", client=True)
        if span.recording:
            span.set("server.address", endpoint.address)
            span.set("server.port", endpoint.port)
            if endpoint.spiffe_id is not None:
                span.set("mesh.upstream.spiffe_id", str(endpoint.spiffe_id))
        span.inject(request.headers)
        try:
            response = await self._forwarder.forward(request, endpoint, route, exchange)
            if span.recording:
                span.set("http.response.status_code", response.status)
                span.set("mesh.upstream.retries", exchange.retries)
            return response
        except GatewayError as error:
            span.fail(error)
            raise
        finally:
            span.end()
