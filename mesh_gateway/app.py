"""Composition root: builds everything from GatewayConfig, wires the Watches, supervises, drains on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from mesh_gateway import config as cfg
from mesh_gateway.authz import build as authz_build
from mesh_gateway.authz.policyset import PolicyError
from mesh_gateway.discovery.runtime import ConsulDiscovery
from mesh_gateway.discovery.static import catalog_from_config, routes_from_config
from mesh_gateway.edges.admin import Admin
from mesh_gateway.edges.admin_views import add_telemetry_views
from mesh_gateway.edges.clusters import clusters_view
from mesh_gateway.edges.grpc import GrpcEdge, ServerCredentials
from mesh_gateway.edges.http import HttpEdge
from mesh_gateway.edges.listener import HttpListener
from mesh_gateway.edges.websocket import WebSocketProxy
from mesh_gateway.identity.ca import CAError, load_ca
from mesh_gateway.identity.provider import (
    IdentitySource,
    IdentityUnavailable,
    certs_view,
    chain_expiries,
    first_credentials,
)
from mesh_gateway.identity.tls import ServerTls
from mesh_gateway.model import Catalog, Credentials, SpiffeId
from mesh_gateway.pipeline import AllowAll, Authorizer, Exchange, Pipeline
from mesh_gateway.process import (
    StartupError,
    access_log_and_tracer,
    bind,
    configure_logging,
    identity_source,
    new_event_loop,
    run_until_signalled,
    serve_admin,
)
from mesh_gateway.routing import CompiledRoutes, compile_routes
from mesh_gateway.supervisor import Supervisor
from mesh_gateway.telemetry.metrics import MeteredAuthorizer, Metrics
from mesh_gateway.upstream.balancing import HealthAwarePicker
from mesh_gateway.upstream.circuit import Circuits
from mesh_gateway.upstream.grpc import GrpcForwarder
from mesh_gateway.upstream.h1 import H1Forwarder
from mesh_gateway.upstream.http import HttpForwarder
from mesh_gateway.upstream.outlier import OutlierDetector
from mesh_gateway.upstream.retry import ResilientForwarder
from mesh_gateway.upstream.websocket import WebSocketDialer
from mesh_gateway.watch import Watch

log = logging.getLogger("mesh_gateway")


class Gateway:
    def __init__(self, config: cfg.GatewayConfig, *, authorizer: Authorizer | None = None,
                 credentials: Credentials | None = None, identity_ttl_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic, reuse_port: bool = False,
                 with_admin: bool = True) -> None:
        """`credentials`: the first SVID when it comes from a remote issuer or Consul (see `prepare_identity`).
        `identity_ttl_s`: overrides identity.ttl without its 1-minute floor; tests use it to rotate every few s."""
        self.config = config
        # Set by workers.py: every worker binds the listeners with SO_REUSEPORT; only one serves the admin port.
        self._reuse_port = reuse_port
        self._with_admin = with_admin
        self.gateway_id = SpiffeId.parse(config.identity.spiffe_id)
        ttl_s = identity_ttl_s or config.identity.ttl
        if credentials is None:
            if config.identity.provider != "local" or config.identity.issuer != "local":
                raise StartupError("identity: a remote or consul identity must be obtained first (prepare_identity)")
            try:
                credentials = load_ca(config.identity.ca_dir).issue_credentials(
                    self.gateway_id, ttl_s, config.identity.dns)
            except CAError as exc:
                raise StartupError(f"identity: {exc}") from None
        self.credentials: Watch[Credentials] = Watch(credentials)
        self.file_routes = routes_from_config(config)
        self.routes: Watch[CompiledRoutes] = Watch(compile_routes(self.file_routes))
        static = catalog_from_config(config.catalog)
        self.consul = None if config.discovery.consul is None else ConsulDiscovery(
            config.discovery.consul, trust_domain=config.trust_domain, static=static, file_routes=self.file_routes,
            routes=self.routes)
        self.catalog: Watch[Catalog] = self.consul.catalog if self.consul is not None else Watch(static)
        self.metrics = Metrics() if config.telemetry.metrics.enabled else None
        # aiohttp's client also dials WebSockets; plain HTTP goes through upstream.client (h1 by default).
        self.http_forwarder = HttpForwarder(self.credentials, pool_size=config.upstream.pool_size,
                                            keepalive_s=config.upstream.keepalive_s)
        self.forwarder: H1Forwarder | HttpForwarder = self.http_forwarder if config.upstream.client == "aiohttp" \
            else H1Forwarder(self.credentials, pool_size=config.upstream.pool_size,
                             keepalive_s=config.upstream.keepalive_s,
                             open_connections=self.metrics.upstream_connections if self.metrics else None)
        self.grpc_forwarder = GrpcForwarder(self.credentials, config.protocols.grpc)
        self.websocket_dialer = WebSocketDialer(self.http_forwarder, config.protocols.websocket)
        telemetry = config.telemetry
        self.outlier = OutlierDetector(config.resilience.outlier, clock,
                                       on_eject=self.metrics.upstream_ejected if self.metrics else None)
        self.picker = HealthAwarePicker(config.resilience, self.outlier)
        self.circuits = Circuits(config.resilience)
        resilient = ResilientForwarder(self.forwarder, picker=self.picker, outlier=self.outlier,
                                       circuits=self.circuits, catalog=self.catalog, settings=config.resilience)
        self.identity: IdentitySource = identity_source(config.identity, self.gateway_id, self.credentials,
                                                        ttl_s=ttl_s, metrics=self.metrics)
        self.access_log, self.tracer = access_log_and_tracer(telemetry, telemetry.service_name)
        self.authz: authz_build.BuiltAuthz | None = None
        if authorizer is None:
            try:
                self.authz = authz_build.build(config, lambda: self.gateway_id)
            except PolicyError as exc:
                raise StartupError(f"authz: {exc}") from None
            authorizer = self.authz.authorizer if self.authz else None
        if authorizer is None:
            log.warning("authorization is off: every routed request is allowed")
        elif self.metrics is not None:
            authorizer = MeteredAuthorizer(authorizer, self.metrics)
        self.pipeline = Pipeline(routes=self.routes, catalog=self.catalog, authorizer=authorizer or AllowAll(),
                                 forwarder=resilient, gateway_id=lambda: self.gateway_id, tracer=self.tracer,
                                 picker=self.picker)
        self.admin = Admin()
        self.admin.readiness.append(self._ready)
        self.admin.add_json_view("/certs", lambda: certs_view(self.identity.status(), self.credentials.get()))
        add_telemetry_views(self.admin, config=config, routes=self.routes, metrics=self.metrics)
        if self.metrics is not None:
            self._register_gauges(self.metrics)
        if self.authz is not None:
            self.admin.add_json_view("/policies", self.authz.view)
        if self.consul is not None:
            self.admin.readiness.append(self.consul.watcher.not_synced)
        self.admin.add_json_view("/clusters", lambda: clusters_view(
            self.catalog.get(), outlier=self.outlier, picker=self.picker, circuits=self.circuits,
            consul=self.consul.watcher if self.consul is not None else None))
        self.supervisor = Supervisor()
        self.edges: list[HttpEdge] = []
        self.grpc_edges: list[GrpcEdge] = []
        self.addresses: dict[str, tuple[str, int]] = {}
        self._runners: list[web.BaseRunner | HttpListener] = []
        self._started = False

    def _ready(self) -> str | None:
        if not self._started:
            return "listeners not bound yet"
        if self.credentials.get().not_after <= time.time():
            return "gateway certificate has expired"
        return None

    def _register_gauges(self, metrics: Metrics) -> None:
        metrics.span_source(self.tracer.stats)
        metrics.cert_expiry_source("gateway", lambda: self.credentials.get().not_after)
        # From what the gateway actually holds, so it is true for every identity source (local, remote, consul).
        metrics.cert_expiry_source("intermediate", lambda: chain_expiries(self.credentials.get())[0])
        metrics.cert_expiry_source("root", lambda: chain_expiries(self.credentials.get())[1])
        metrics.discovery_updated(self.catalog.get().services)

    async def _track_discovery(self, metrics: Metrics) -> None:
        """Every catalog snapshot published counts as an update of the services it holds."""
        version = self.catalog.version
        while True:
            if await self.catalog.changed(version, timeout_s=60.0):
                version = self.catalog.version
                services = self.catalog.get().services
                metrics.discovery_updated(services)

    def _completed(self, exchange: Exchange) -> None:
        duration_s = time.perf_counter() - exchange.started
        if self.metrics is not None:
            self.metrics.request_done(exchange, duration_s)
        if self.access_log is not None:
            self.access_log.record(exchange, duration_s)

    def _server_tls(self, listener: cfg.Listener, tls: cfg.ListenerTls, *, http2: bool = False) -> ServerTls:
        static_chain, client_ca = self._listener_files(tls)
        metrics = self.metrics
        return ServerTls(client_auth=tls.client_auth, min_version=tls.min_version, credentials=self.credentials,
                         static_chain=static_chain, client_ca_pem=client_ca,
                         alpn=("h2", "http/1.1") if http2 else ("http/1.1",),
                         on_handshake_error=(lambda: metrics.tls_handshake_error(listener.name)) if metrics else None)

    def _listener_files(self, tls: cfg.ListenerTls) -> tuple[tuple[bytes, bytes] | None, bytes | None]:
        static_chain = None
        if tls.cert is not None and tls.key is not None:
            try:
                static_chain = (Path(tls.cert).read_bytes(), Path(tls.key).read_bytes())
            except OSError as exc:
                raise StartupError(f"listener certificate: {exc}") from None
        client_ca = None
        if tls.client_ca is not None:
            try:
                client_ca = Path(tls.client_ca).read_bytes()
            except OSError as exc:
                raise StartupError(f"listener client_ca: {exc}") from None
        return static_chain, client_ca

    async def start(self) -> None:
        """Bind every listener and the admin port; the gateway is serving when this returns.

        If any listener cannot be bound, the ones already bound are closed again before the error propagates."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        for listener in self.config.listeners:
            if listener.protocol == "grpc":
                await self._start_grpc(listener)
                continue
            edge = HttpEdge(name=listener.name, pipeline=self.pipeline, limits=self.config.limits,
                            tls=listener.tls is not None, on_complete=[self._completed])
            if self.config.protocols.websocket.enabled:
                edge.websockets = WebSocketProxy(self.pipeline, self.websocket_dialer, self.config.protocols.websocket)
            server_tls = self._server_tls(listener, listener.tls, http2=listener.http2) if listener.tls else None
            sock = bind(listener.address, reuse_port=self._reuse_port)
            http_listener = HttpListener(
                edge, server=listener.server, ssl_context=server_tls.front if server_tls else None,
                http2=self.config.protocols.http2 if server_tls is not None and listener.http2 else None,
                drain_timeout_s=self.config.drain_timeout_s)
            self._runners.append(http_listener)
            await http_listener.start(sock)
            self.edges.append(edge)
            self.addresses[listener.name] = sock.getsockname()[:2]
        if self._with_admin:
            admin_runner, self.addresses["admin"] = await serve_admin(self.admin, self.config.admin.address)
            self._runners.append(admin_runner)
        self.supervisor.start("identity", self.identity.run)
        if self.access_log is not None:
            self.supervisor.start("access-log", self.access_log.run)
        if self.metrics is not None:
            metrics = self.metrics
            self.supervisor.start("discovery-age", lambda: self._track_discovery(metrics))
        if self.authz is not None and self.authz.embedded is not None:
            self.supervisor.start("policy-watcher", self.authz.embedded.watch)
        if self.authz is not None:
            self.supervisor.start("decision-log", self.authz.authorizer.decision_log.run)
        self._started = True
        if self.consul is not None:
            self.consul.start(self.supervisor.start, listener=self.addresses[self.config.listeners[0].name],
                              admin=self.addresses.get("admin", cfg.split_host_port(self.config.admin.address)),
                              ready=lambda: next(iter(self.admin.not_ready_reasons()), None))
        log.info("gateway %s serving: %s", self.gateway_id,
                 ", ".join(f"{name}={host}:{port}" for name, (host, port) in self.addresses.items()))

    @property
    def drain_timeout_s(self) -> float:
        return self.config.drain_timeout_s

    async def _start_grpc(self, listener: cfg.Listener) -> None:
        edge = GrpcEdge(name=listener.name, pipeline=self.pipeline, forwarder=self.grpc_forwarder,
                        settings=self.config.protocols.grpc, tls=listener.tls is not None,
                        on_complete=[self._completed])
        credentials = None
        if listener.tls is not None:
            static_chain, client_ca = self._listener_files(listener.tls)
            required = listener.tls.client_auth == "required"
            credentials = ServerCredentials(self.credentials, require_client_cert=required,
                                            static_chain=static_chain, client_ca_pem=client_ca).build()
        try:
            self.addresses[listener.name] = await edge.start(listener.address, credentials)
        except (OSError, RuntimeError) as exc:
            raise StartupError(f"cannot listen on {listener.address}: {exc}") from None
        self.grpc_edges.append(edge)

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish within drain_timeout_s, then close everything."""
        if self.consul is not None:
            await self.consul.deregister()
        self._started = False
        await asyncio.gather(*(runner.cleanup() for runner in self._runners),
                             *(edge.stop(self.config.drain_timeout_s) for edge in self.grpc_edges))
        self._runners.clear()
        self.grpc_edges.clear()
        await self.supervisor.stop()
        if self.consul is not None:
            await self.consul.close()
        await self.forwarder.close()
        if self.http_forwarder is not self.forwarder:
            await self.http_forwarder.close()
        await self.grpc_forwarder.close()
        await self.websocket_dialer.close()
        if self.access_log is not None:
            self.access_log.close()
        # Export runs on its own thread; the flush at shutdown is bounded by tracing.shutdown_timeout_s.
        await asyncio.to_thread(self.tracer.shutdown)
        if self.authz is not None:
            await self.authz.authorizer.close()


async def prepare_identity(config: cfg.GatewayConfig, ttl_s: float | None = None) -> Credentials | None:
    """The first SVID when it does not come from a local CA directory (remote issuer, Consul); else None."""
    if config.identity.provider == "local" and config.identity.issuer == "local":
        return None
    try:
        return await first_credentials(config.identity, SpiffeId.parse(config.identity.spiffe_id),
                                       ttl_s or config.identity.ttl)
    except IdentityUnavailable as exc:
        raise StartupError(str(exc)) from None


def serve(config: cfg.GatewayConfig, *, reuse_port: bool = False, with_admin: bool = True) -> int:
    configure_logging()

    async def main() -> int:
        try:
            gateway = Gateway(config, credentials=await prepare_identity(config), reuse_port=reuse_port,
                              with_admin=with_admin)
            return await run_until_signalled(gateway)
        except StartupError as exc:
            log.error("cannot start: %s", exc)
            return 1

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main())
