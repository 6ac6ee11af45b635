"""The gRPC edge: a grpc.aio server whose one generic handler forwards every method as raw bytes.

A call becomes a `RequestInfo` (is_grpc, method POST, path /pkg.Service/Method, headers from metadata) and goes
through the same routing and authorization as HTTP (`Pipeline.admit`), then to `GrpcForwarder`. The serving
certificate follows the gateway's rotating SVID through `dynamic_ssl_server_credentials`: grpc asks before each
handshake, and gets a new certificate configuration only when the credentials version moved.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import re
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from mesh_gateway import headers as hdrs
from mesh_gateway.config import GrpcSettings
from mesh_gateway.edges.http import adopt_request_id
from mesh_gateway.errors import Forbidden, GatewayError, Unauthenticated, as_gateway_error
from mesh_gateway.model import Credentials, PeerCert, RequestInfo
from mesh_gateway.pipeline import Exchange, Pipeline, Span
from mesh_gateway.spiffe import IdentityError, spiffe_id_from_uris
from mesh_gateway.upstream.grpc import GrpcForwarder, Metadata, UpstreamCall
from mesh_gateway.watch import Watch

log = logging.getLogger("mesh_gateway.edge.grpc")

CompletionHook = Callable[[Exchange], None]
if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[bytes, bytes]
    _HandlerBase = grpc.GenericRpcHandler[bytes, bytes]
else:
    Context = grpc.aio.ServicerContext
    _HandlerBase = grpc.GenericRpcHandler
# grpc owns these on every hop (framing, deadline, compression, its own user agent); "grpc-" is reserved by the
# protocol, pseudo-headers are HTTP/2's.
_RESERVED = frozenset({"te", "content-type", "user-agent", "host", "grpc-timeout", "grpc-encoding",
                       "grpc-accept-encoding", "grpc-status", "grpc-message", "grpc-status-details-bin"})


_METHOD = re.compile(r"/[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*/[A-Za-z_][A-Za-z0-9_]*")


def _reserved(name: str) -> bool:
    return name in _RESERVED or name.startswith((":", "grpc-"))


def request_headers(metadata: Metadata) -> tuple[tuple[str, str], ...]:
    """Metadata as the header list authz and routing see: binary values in their base64 wire form."""
    out = []
    for key, value in metadata:
        name = key.lower()
        if isinstance(value, bytes):
            out.append((name, base64.b64encode(value).decode().rstrip("=")))
        else:
            out.append((name, value))
    return tuple(out)


def upstream_metadata(headers: list[tuple[str, str]]) -> list[tuple[str, str | bytes]]:
    out: list[tuple[str, str | bytes]] = []
    for name, value in headers:
        if _reserved(name) or (name == "x-forwarded-host" and not value):
            continue
        if name.endswith("-bin"):
            out.append((name, base64.b64decode(value + "=" * (-len(value) % 4))))
        else:
            out.append((name, value))
    return out


def response_metadata(metadata: Metadata) -> list[tuple[str, str | bytes]]:
    drop = hdrs.HOP_BY_HOP | hdrs.connection_listed((k, v) for k, v in metadata if isinstance(v, str))
    return [(k, v) for k, v in metadata if k not in drop and not _reserved(k)]


def peer_from_auth_context(auth: Mapping[str, Iterable[bytes]]) -> PeerCert | None:
    """The client's SPIFFE ID from the verified leaf grpc reports; the same exactly-one-URI-SAN rule as HTTP."""
    pems = list(auth.get("x509_pem_cert") or ())
    if not pems:
        return None
    pem: bytes | str = pems[0]
    cert = x509.load_pem_x509_certificate(pem if isinstance(pem, bytes) else pem.encode())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    try:
        spiffe_id = spiffe_id_from_uris(uris)
    except IdentityError as exc:
        raise Unauthenticated(str(exc), public_message="client certificate must carry exactly one SPIFFE ID"
                              ) from None
    return PeerCert(spiffe_id, cert.public_bytes(Encoding.DER))


def parse_peer(peer: str) -> tuple[str, int]:
    """grpc's peer string (`ipv4:1.2.3.4:5`, `ipv6:[::1]:5`) → address and port."""
    _, _, rest = peer.partition(":")
    host, _, port = rest.rpartition(":")
    return host.strip("[]"), int(port) if port.isdigit() else 0


class ServerCredentials:
    """dynamic_ssl_server_credentials fed from the credentials Watch (or a static chain from the listener)."""

    def __init__(self, credentials: Watch[Credentials], *, require_client_cert: bool,
                 static_chain: tuple[bytes, bytes] | None, client_ca_pem: bytes | None) -> None:
        self._credentials = credentials
        self._require = require_client_cert
        self._static_chain = static_chain
        self._client_ca_pem = client_ca_pem
        self._version = credentials.version

    def _configuration(self) -> Any:
        creds = self._credentials.get()
        chain, key = self._static_chain or (creds.cert_chain_pem, creds.key_pem)
        roots = (self._client_ca_pem or creds.bundle_pem) if self._require else None
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=roots)

    def _fetch(self) -> Any:
        # Called by grpc before each handshake, possibly from one of its own threads: reads only.
        version = self._credentials.version
        if version == self._version:
            return None
        self._version = version
        return self._configuration()

    def build(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self._configuration(), self._fetch,
                                                   require_client_authentication=self._require)


class GrpcEdge:
    def __init__(self, *, name: str, pipeline: Pipeline, forwarder: GrpcForwarder, settings: GrpcSettings,
                 tls: bool, on_complete: list[CompletionHook] | None = None) -> None:
        self.name = name
        self._pipeline = pipeline
        self._forwarder = forwarder
        self._settings = settings
        self._scheme = "https" if tls else "http"
        self._local: tuple[str, int] = ("", 0)
        self.on_complete: list[CompletionHook] = on_complete if on_complete is not None else []
        self.server: grpc.aio.Server | None = None

    async def start(self, address: str, credentials: grpc.ServerCredentials | None) -> tuple[str, int]:
        size = self._settings.max_message_bytes
        server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size),
                     ("grpc.so_reuseport", 0)],
            maximum_concurrent_rpcs=self._settings.max_concurrent_rpcs,
        )
        server.add_generic_rpc_handlers([_Handler(self)])
        port = (server.add_secure_port(address, credentials) if credentials is not None
                else server.add_insecure_port(address))
        if not port:
            raise OSError(f"cannot listen on {address}")
        await server.start()
        self.server = server
        host = address.rpartition(":")[0].strip("[]")
        self._local = (host, port)
        return self._local

    async def stop(self, grace_s: float) -> None:
        if self.server is not None:
            await self.server.stop(grace_s)
            self.server = None

    def _request_info(self, context: Context, method: str) -> RequestInfo:
        headers = request_headers(tuple(context.invocation_metadata() or ()))
        request_id = adopt_request_id(next((v for k, v in headers if k == "x-request-id"), None))
        address, port = parse_peer(context.peer() or "")
        peer = peer_from_auth_context(context.auth_context()) if self._scheme == "https" else None
        return RequestInfo(
            method="POST", path=method, query="",
            # grpcio does not expose :authority to handlers; gRPC routes match on service and method.
            host="", scheme=self._scheme, headers=headers, client_address=address, client_port=port,
            request_id=request_id, protocol="HTTP/2", listener=self.name, local_address=self._local[0],
            local_port=self._local[1], peer=peer, is_grpc=True,
        )

    async def handle(self, method: str, requests: AsyncIterator[bytes], context: Context) -> None:
        try:
            info = self._request_info(context, method)
        except GatewayError as error:
            await context.abort(grpc.StatusCode[error.grpc_code], error.public_message)
            return
        exchange = Exchange(info, span=self._pipeline.tracer.ingress(info))  # rpc.* attributes from info.is_grpc
        code = grpc.StatusCode.OK
        try:
            code = await self._proxy(exchange, requests, context)
        except GatewayError as error:
            code = self._fail(exchange, error)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            log.error("unexpected error handling gRPC call %s", info.request_id, exc_info=exc)
            code = self._fail(exchange, as_gateway_error(exc))
        finally:
            self._finish(exchange, code)
        if exchange.error is not None:
            await context.abort(code, exchange.error.public_message)

    def _fail(self, exchange: Exchange, error: GatewayError) -> grpc.StatusCode:
        exchange.error = error
        exchange.span.fail(error)
        return grpc.StatusCode[error.grpc_code]

    async def _proxy(self, exchange: Exchange, requests: AsyncIterator[bytes],
                     context: Context) -> grpc.StatusCode:
        decision = await self._pipeline.admit(exchange)
        if not decision.allowed:
            raise Forbidden(f"denied by policy (decision {decision.decision_id or '-'})")
        route, endpoint = exchange.route, exchange.endpoint
        assert route is not None and endpoint is not None
        headers = self._pipeline.upstream_headers(exchange)
        span = self._pipeline.tracer.child(exchange.span, "upstream", client=True)
        span.set("rpc.system", "grpc")
        span.set("server.address", endpoint.address)
        span.set("server.port", endpoint.port)
        if endpoint.spiffe_id is not None:
            span.set("mesh.upstream.spiffe_id", str(endpoint.spiffe_id))
        span.inject(headers)
        remaining = context.time_remaining()
        timeout_s = min(route.policy.timeout_s, remaining if remaining is not None else math.inf)
        try:
            call = await self._forwarder.open(endpoint, exchange.info.path, upstream_metadata(headers),
                                              timeout_s=max(timeout_s, 0.001),
                                              connect_timeout_s=route.policy.connect_timeout_s)
            code = await self._relay(call, exchange, requests, context, span)
        except GatewayError as error:
            span.fail(error)
            raise
        finally:
            span.end()
        return code

    async def _relay(self, call: UpstreamCall, exchange: Exchange, requests: AsyncIterator[bytes],
                     context: Context, span: Span) -> grpc.StatusCode:
        sender = asyncio.ensure_future(call.send_all(self._count(requests, exchange)))
        sender.add_done_callback(_quietly)
        try:
            await context.send_initial_metadata(response_metadata(await call.initial_metadata()))
            async for message in call.receive():
                exchange.bytes_out += len(message)
                await context.write(message)
            status = await call.status()
        finally:
            sender.cancel()
            call.cancel()  # no-op once finished; stops the upstream call when the client went away
        span.set("rpc.grpc.status_code", status.code.value[0])
        context.set_trailing_metadata(tuple(response_metadata(status.trailing_metadata)))
        if status.code != grpc.StatusCode.OK:
            # The upstream's own status and message, passed through unchanged.
            context.set_code(status.code)
            context.set_details(status.details)
        return status.code

    async def _count(self, requests: AsyncIterator[bytes], exchange: Exchange) -> AsyncIterator[bytes]:
        async for message in requests:
            exchange.bytes_in += len(message)
            yield message

    def _finish(self, exchange: Exchange, code: grpc.StatusCode) -> None:
        # On the wire a gRPC call is always HTTP 200; logs and metrics get the HTTP status of the gateway's own
        # refusal (403, 404, 502, ...) so they read like HTTP's, and the grpc code is on the span.
        exchange.status = exchange.error.status if exchange.error is not None else 200
        exchange.span.set("rpc.grpc.status_code", code.value[0])
        exchange.span.end()
        for hook in self.on_complete:
            try:
                hook(exchange)
            except Exception:  # a broken log sink must not break calls
                log.exception("completion hook failed")


def _quietly(task: asyncio.Future[None]) -> None:
    # The client's request stream can end in an error when the client goes away; the call's own outcome (or its
    # cancellation) already reports that, so the sender's exception is only collected, not raised again.
    if not task.cancelled() and task.exception() is not None:
        log.debug("gRPC request stream ended: %r", task.exception())


class _Handler(_HandlerBase):
    def __init__(self, edge: GrpcEdge) -> None:
        self._edge = edge

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        method: str = handler_call_details.method
        if not _METHOD.fullmatch(method):
            # Not /package.Service/Method: grpc answers UNIMPLEMENTED. Being strict here means the path routes
            # and policies see has exactly one spelling (no escapes, dots or extra slashes to normalise).
            return None
        edge = self._edge

        async def behaviour(requests: AsyncIterator[bytes], context: Context) -> None:
            await edge.handle(method, requests, context)

        return grpc.stream_stream_rpc_method_handler(behaviour, request_deserializer=None,
                                                     response_serializer=None)
