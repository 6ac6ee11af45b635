"""Composition root for sidecar mode: one local service, an mTLS inbound listener in front of it and a loopback
outbound listener through which it calls the rest of the mesh. Same edges, pipeline and forwarder as the gateway;
only the wiring differs (two pipelines, routes derived from config and catalog).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time

from aiohttp import web

from mesh_gateway.authz import build as authz_build
from mesh_gateway.authz.policyset import PolicyError
from mesh_gateway.discovery.static import catalog_from_config
from mesh_gateway.edges.admin import Admin
from mesh_gateway.edges.admin_views import redact, route_view
from mesh_gateway.edges.grpc import GrpcEdge, ServerCredentials
from mesh_gateway.edges.http import HttpEdge
from mesh_gateway.edges.listener import HttpListener
from mesh_gateway.identity.provider import (
    IdentitySource,
    IdentityUnavailable,
    certs_view,
    first_credentials,
)
from mesh_gateway.identity.tls import ServerTls
from mesh_gateway.model import Catalog, Credentials, SpiffeId
from mesh_gateway.pipeline import AllowAll, Authorizer, Exchange, Pipeline
from mesh_gateway.process import (
    StartupError,
    access_log_and_tracer,
    configure_logging,
    identity_source,
    new_event_loop,
    run_until_signalled,
    serve_admin,
    serve_edge,
)
from mesh_gateway.routing import CompiledRoutes, compile_routes
from mesh_gateway.sidecar_config import SidecarConfig
from mesh_gateway.sidecar_consul import SidecarConsul
from mesh_gateway.sidecar_routing import (
    PeerCheck,
    inbound_table,
    local_catalog,
    outbound_table,
    service_addressing,
)
from mesh_gateway.supervisor import Supervisor
from mesh_gateway.telemetry.metrics import CONTENT_TYPE, MeteredAuthorizer, Metrics
from mesh_gateway.upstream.balancing import HealthAwarePicker
from mesh_gateway.upstream.circuit import Circuits
from mesh_gateway.upstream.grpc import GrpcForwarder
from mesh_gateway.upstream.h1 import H1Forwarder
from mesh_gateway.upstream.http import HttpForwarder
from mesh_gateway.upstream.outlier import OutlierDetector
from mesh_gateway.upstream.retry import ResilientForwarder
from mesh_gateway.watch import Watch

log = logging.getLogger("mesh_gateway.sidecar")

CATALOG_FOLLOW_S = 30.0
APP_PROBE_TIMEOUT_S = 1.0


async def first_svid(config: SidecarConfig, *, join_token: str | None = None) -> Credentials:
    """The SVID to start with: bootstrap from the CA API with a join token (`issuer: remote`), from Consul's CA,
    or signed in-process from `identity.ca_dir` (`issuer: local`). StartupError says why it failed."""
    identity = config.identity
    try:
        return await first_credentials(identity, SpiffeId.parse(identity.spiffe_id), identity.ttl,
                                       join_token=join_token)
    except IdentityUnavailable as exc:
        raise StartupError(str(exc)) from None


class Sidecar:
    def __init__(self, config: SidecarConfig, credentials: Credentials, *, policy: Authorizer | None = None
                 ) -> None:
        """`credentials`: the first SVID (`first_svid`); renewed from then on by the identity source.
        `policy`: an inbound authorizer instead of the one built from `authz:`."""
        self.config = config
        self.spiffe_id = SpiffeId.parse(config.identity.spiffe_id)
        self.credentials: Watch[Credentials] = Watch(credentials)
        client = H1Forwarder if config.upstream.client == "h1" else HttpForwarder
        self.forwarder: H1Forwarder | HttpForwarder = client(
            self.credentials, pool_size=config.upstream.pool_size, keepalive_s=config.upstream.keepalive_s)
        telemetry = config.telemetry
        self.metrics = Metrics() if telemetry.metrics.enabled else None
        self.identity: IdentitySource = identity_source(config.identity, self.spiffe_id, self.credentials,
                                                        ttl_s=config.identity.ttl, metrics=self.metrics)
        self.access_log, self.tracer = access_log_and_tracer(telemetry, config.service_name)
        self.authz: authz_build.BuiltAuthz | None = None
        if policy is None and config.authz is not None and config.authz.engine != "none":
            try:
                self.authz = authz_build.build_from_section(config.authz, lambda: self.spiffe_id,
                                                            queries=(config.authz.query,))
            except PolicyError as exc:
                raise StartupError(f"authz: {exc}") from None
            policy = self.authz.authorizer
        if policy is not None and self.metrics is not None:
            policy = MeteredAuthorizer(policy, self.metrics)
        if policy is None:
            who = ("only inbound.allowed_peers" if config.inbound.allowed_peers
                   else f"any caller of trust domain {config.trust_domain}")
            log.warning("no inbound policy: %s may call %s", who, config.service.name)
        allowed = tuple(SpiffeId.parse(p) for p in config.inbound.allowed_peers)
        self.inbound_routes: Watch[CompiledRoutes] = Watch(compile_routes(inbound_table(config)))
        self.inbound = Pipeline(
            routes=self.inbound_routes, catalog=Watch(local_catalog(config)),
            authorizer=PeerCheck(config.trust_domain, allowed, policy), forwarder=self.forwarder,
            gateway_id=lambda: self.spiffe_id, tracer=self.tracer)
        static = catalog_from_config(config.catalog)
        self.consul = SidecarConsul(config, static) if config.consul is not None else None
        self.catalog: Watch[Catalog] = self.consul.catalog if self.consul is not None else Watch(static)
        self._routed_version = self.catalog.version
        self.outbound_routes: Watch[CompiledRoutes] = Watch(self._outbound_routes(self.catalog.get()))
        # Outbound calls get the gateway's resilience: health-aware balancing, outlier ejection, retries.
        self.outlier = OutlierDetector(config.resilience.outlier,
                                       on_eject=self.metrics.upstream_ejected if self.metrics else None)
        self.picker = HealthAwarePicker(config.resilience, self.outlier)
        resilient = ResilientForwarder(self.forwarder, picker=self.picker, outlier=self.outlier,
                                       circuits=Circuits(config.resilience), catalog=self.catalog,
                                       settings=config.resilience)
        self.outbound = Pipeline(routes=self.outbound_routes, catalog=self.catalog, authorizer=AllowAll(),
                                 forwarder=resilient, gateway_id=lambda: self.spiffe_id, tracer=self.tracer,
                                 picker=self.picker)
        grpc = config.service.protocol == "grpc"
        self.grpc_forwarder = GrpcForwarder(self.credentials, config.grpc) if grpc else None
        self.grpc_edge: GrpcEdge | None = None
        self.admin = Admin()
        self.admin.readiness.append(self._ready)
        if self.consul is not None:
            self.admin.readiness.append(self.consul.watcher.not_synced)
        self._admin_views()
        self.supervisor = Supervisor()
        self.addresses: dict[str, tuple[str, int]] = {}
        self._runners: list[web.BaseRunner | HttpListener] = []
        self._started = False
        self._app_problem: str | None = None

    @property
    def drain_timeout_s(self) -> float:
        return self.config.drain_timeout_s

    def _admin_views(self) -> None:
        admin = self.admin
        admin.add_json_view("/config", lambda: redact(self.config.model_dump(mode="json")))
        admin.add_json_view("/routes", lambda: {
            "inbound": [route_view(r) for r in self.inbound_routes.get().table.routes],
            "outbound": [route_view(r) for r in self.outbound_routes.get().table.routes]})
        if self.authz is not None:
            admin.add_json_view("/policies", self.authz.view)
        admin.add_json_view("/certs", lambda: certs_view(self.identity.status(), self.credentials.get()))
        metrics = self.metrics
        if metrics is not None:
            metrics.span_source(self.tracer.stats)
            metrics.cert_expiry_source("sidecar", lambda: self.credentials.get().not_after)

            async def scrape(_: web.Request) -> web.Response:
                return web.Response(body=metrics.exposition(), headers={"content-type": CONTENT_TYPE})

            admin.add_handler("/metrics", scrape)

    def _completed(self, exchange: Exchange) -> None:
        duration_s = time.perf_counter() - exchange.started
        if self.metrics is not None:
            self.metrics.request_done(exchange, duration_s)
        if self.access_log is not None:
            self.access_log.record(exchange, duration_s)

    def _outbound_routes(self, catalog: Catalog) -> CompiledRoutes:
        outbound = self.config.outbound
        return compile_routes(outbound_table(catalog, timeout_s=outbound.timeout_s, retries=outbound.retries,
                                             max_body_bytes=self.config.limits.max_body_bytes))

    async def _follow_catalog(self) -> None:
        """Keep the outbound routes in step with the catalog (services appear and vanish with discovery)."""
        while True:
            # From the version the current routes were built from, so a change before this task ran is not lost.
            if await self.catalog.changed(self._routed_version, CATALOG_FOLLOW_S):
                self._routed_version = self.catalog.version
                self.outbound_routes.publish(self._outbound_routes(self.catalog.get()))

    async def probe_app(self) -> str | None:
        """One TCP connect to the app (bounded); None when it accepts, else why not. Feeds readiness, so an
        orchestrator or Consul stops sending traffic to a sidecar whose app is down."""
        app = self.config.service
        try:
            async with asyncio.timeout(APP_PROBE_TIMEOUT_S):
                _, writer = await asyncio.open_connection(app.address, app.port)
        except (OSError, TimeoutError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            return f"local app at {app.address}:{app.port} does not accept connections ({reason})"
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return None

    async def _probe_app_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.service.probe_interval_s)
            reason = await self.probe_app()
            if reason != self._app_problem:
                if reason is None:
                    log.info("local app is accepting connections again")
                else:
                    log.warning("%s", reason)
            self._app_problem = reason

    def _ready(self) -> str | None:
        if not self._started:
            return "listeners not bound yet"
        if self._app_problem is not None:
            return self._app_problem
        if self.credentials.get().not_after <= time.time():
            return "sidecar certificate has expired"
        return None

    async def start(self) -> None:
        config = self.config
        try:
            if self.grpc_forwarder is not None:
                await self._serve_grpc(self.grpc_forwarder)
            else:
                inbound_tls = ServerTls(client_auth="required", min_version=config.inbound.min_version,
                                        credentials=self.credentials)
                inbound = HttpEdge(name="inbound", pipeline=self.inbound, limits=config.limits, tls=True,
                                   on_complete=[self._completed])
                await self._serve(inbound, config.inbound.address, inbound_tls.front)
            if config.outbound.enabled:
                outbound = HttpEdge(name="outbound", pipeline=self.outbound, limits=config.limits, tls=False,
                                    rewrite=service_addressing, on_complete=[self._completed])
                await self._serve(outbound, config.outbound.address, None)
            runner, self.addresses["admin"] = await serve_admin(self.admin, config.admin.address)
            self._runners.append(runner)
        except BaseException:
            await self.stop()
            raise
        self._app_problem = await self.probe_app()
        if self._app_problem is not None:
            log.warning("%s (not ready until it does)", self._app_problem)
        self.supervisor.start("identity", self.identity.run)
        self.supervisor.start("app-probe", self._probe_app_forever)
        self.supervisor.start("outbound-routes", self._follow_catalog)
        if self.access_log is not None:
            self.supervisor.start("access-log", self.access_log.run)
        if self.authz is not None and self.authz.embedded is not None:
            self.supervisor.start("policy-watcher", self.authz.embedded.watch)
        if self.authz is not None:
            self.supervisor.start("decision-log", self.authz.authorizer.decision_log.run)
        if self.consul is not None:
            self.consul.start(self.supervisor.start, inbound=self.addresses["inbound"],
                              admin=self.addresses["admin"], app_ready=lambda: self._app_problem,
                              sidecar_ready=lambda: next(iter(self.admin.not_ready_reasons()), None))
        self._started = True
        log.info("sidecar %s for %s (app at %s:%d) serving: %s", self.spiffe_id, config.service.name,
                 config.service.address, config.service.port,
                 ", ".join(f"{name}={host}:{port}" for name, (host, port) in self.addresses.items()))

    async def _serve(self, edge: HttpEdge, address: str, ssl_context: ssl.SSLContext | None) -> None:
        runner, bound = await serve_edge(edge, address, ssl_context, drain_timeout_s=self.config.drain_timeout_s)
        self._runners.append(runner)
        self.addresses[edge.name] = bound

    async def _serve_grpc(self, forwarder: GrpcForwarder) -> None:
        """gRPC in (mTLS, client certificate required, SVID hot-swapped per handshake), plaintext gRPC to the app."""
        edge = GrpcEdge(name="inbound", pipeline=self.inbound, forwarder=forwarder, settings=self.config.grpc,
                        tls=True, on_complete=[self._completed])
        credentials = ServerCredentials(self.credentials, require_client_cert=True, static_chain=None,
                                        client_ca_pem=None).build()
        try:
            self.addresses["inbound"] = await edge.start(self.config.inbound.address, credentials)
        except (OSError, RuntimeError) as exc:
            raise StartupError(f"cannot listen on {self.config.inbound.address}: {exc}") from None
        self.grpc_edge = edge

    async def stop(self) -> None:
        if self.consul is not None:
            # Out of Consul first, so callers stop picking this sidecar while it drains.
            await self.consul.deregister()
        self._started = False
        if self.grpc_edge is not None:
            await self.grpc_edge.stop(self.config.drain_timeout_s)
            self.grpc_edge = None
        await asyncio.gather(*(runner.cleanup() for runner in self._runners))
        self._runners.clear()
        await self.supervisor.stop()
        if self.consul is not None:
            await self.consul.close()
        await self.forwarder.close()
        if self.grpc_forwarder is not None:
            await self.grpc_forwarder.close()
        if self.access_log is not None:
            self.access_log.close()
        await asyncio.to_thread(self.tracer.shutdown)
        if self.authz is not None:
            await self.authz.authorizer.close()


def serve(config: SidecarConfig, *, join_token: str | None = None) -> int:
    configure_logging()

    async def main() -> int:
        try:
            sidecar = Sidecar(config, await first_svid(config, join_token=join_token))
            return await run_until_signalled(sidecar)
        except StartupError as exc:
            log.error("cannot start: %s", exc)
            return 1

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main())
