"""Composition root: builds everything from GatewayConfig, wires the Watches, supervises, drains on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from mesh_gateway import config as cfg
from mesh_gateway.discovery.consul import ConsulWatcher
from mesh_gateway.discovery.consul_client import ConsulClient
from mesh_gateway.discovery.register import Registrar
from mesh_gateway.discovery.static import catalog_from_config, routes_from_config
from mesh_gateway.edges.admin import Admin
from mesh_gateway.edges.clusters import clusters_view
from mesh_gateway.edges.http import HttpEdge
from mesh_gateway.identity.ca import CAError, load_ca
from mesh_gateway.identity.tls import ServerTls
from mesh_gateway.model import Catalog, Credentials, Route, RouteTable, SpiffeId
from mesh_gateway.pipeline import AllowAll, Authorizer, Pipeline
from mesh_gateway.routing import CompiledRoutes, compile_routes
from mesh_gateway.supervisor import Supervisor
from mesh_gateway.upstream.balancing import HealthAwarePicker
from mesh_gateway.upstream.circuit import Circuits
from mesh_gateway.upstream.http import HttpForwarder
from mesh_gateway.upstream.outlier import OutlierDetector
from mesh_gateway.upstream.retry import ResilientForwarder
from mesh_gateway.watch import Watch

log = logging.getLogger("mesh_gateway")


class StartupError(Exception):
    """The gateway cannot start; the message says why in one line."""


def bind(address: str, *, reuse_port: bool = False) -> socket.socket:
    host, port = cfg.split_host_port(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {address}: {exc.strerror}") from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class Gateway:
    def __init__(self, config: cfg.GatewayConfig, *, authorizer: Authorizer | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.gateway_id = SpiffeId.parse(config.identity.spiffe_id)
        try:
            self.ca = load_ca(config.identity.ca_dir)
            first = self.ca.issue_credentials(self.gateway_id, config.identity.ttl, config.identity.dns)
        except CAError as exc:
            raise StartupError(f"identity: {exc}") from None
        self.credentials: Watch[Credentials] = Watch(first)
        static = catalog_from_config(config.catalog)
        self.consul: ConsulWatcher | None = None
        self.registrar: Registrar | None = None
        if config.discovery.consul is not None:
            self.consul = ConsulWatcher(ConsulClient(config.discovery.consul), trust_domain=config.trust_domain,
                                        static=static)
            self.catalog: Watch[Catalog] = self.consul.catalog
        else:
            self.catalog = Watch(static)
        self.file_routes = routes_from_config(config)
        self.routes: Watch[CompiledRoutes] = Watch(compile_routes(self.file_routes))
        self.forwarder = HttpForwarder(self.credentials, pool_size=config.upstream.pool_size,
                                       keepalive_s=config.upstream.keepalive_s)
        self.outlier = OutlierDetector(config.resilience.outlier, clock)
        self.picker = HealthAwarePicker(config.resilience, self.outlier)
        self.circuits = Circuits(config.resilience)
        resilient = ResilientForwarder(self.forwarder, picker=self.picker, outlier=self.outlier,
                                       circuits=self.circuits, catalog=self.catalog, settings=config.resilience)
        if authorizer is None:
            log.warning("authorization is off: every routed request is allowed")
        self.pipeline = Pipeline(routes=self.routes, catalog=self.catalog, authorizer=authorizer or AllowAll(),
                                 forwarder=resilient, gateway_id=lambda: self.gateway_id, picker=self.picker)
        self.admin = Admin()
        self.admin.readiness.append(self._ready)
        self.admin.add_json_view("/clusters", lambda: clusters_view(
            self.catalog.get(), outlier=self.outlier, picker=self.picker, circuits=self.circuits,
            consul=self.consul))
        self.supervisor = Supervisor()
        self.edges: list[HttpEdge] = []
        self.addresses: dict[str, tuple[str, int]] = {}
        self._runners: list[web.BaseRunner] = []
        self._started = False

    def _ready(self) -> str | None:
        if not self._started:
            return "listeners not bound yet"
        if self.credentials.get().not_after <= time.time():
            return "gateway certificate has expired"
        return None

    def _server_tls(self, tls: cfg.ListenerTls) -> ServerTls:
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
        return ServerTls(client_auth=tls.client_auth, min_version=tls.min_version, credentials=self.credentials,
                         static_chain=static_chain, client_ca_pem=client_ca)

    async def start(self) -> None:
        """Bind every listener and the admin port; the gateway is serving when this returns."""
        for listener in self.config.listeners:
            edge = HttpEdge(name=listener.name, pipeline=self.pipeline, limits=self.config.limits,
                            tls=listener.tls is not None)
            server_tls = self._server_tls(listener.tls) if listener.tls else None
            runner = web.ServerRunner(edge.server(), shutdown_timeout=self.config.drain_timeout_s)
            await runner.setup()
            sock = bind(listener.address)
            site = web.SockSite(runner, sock, ssl_context=server_tls.front if server_tls else None)
            await site.start()
            self._runners.append(runner)
            self.edges.append(edge)
            self.addresses[listener.name] = sock.getsockname()[:2]
        admin_runner = web.AppRunner(self.admin.app, access_log=None, shutdown_timeout=1.0)
        await admin_runner.setup()
        admin_sock = bind(self.config.admin.address)
        await web.SockSite(admin_runner, admin_sock).start()
        self._runners.append(admin_runner)
        self.addresses["admin"] = admin_sock.getsockname()[:2]
        self._started = True
        self._start_discovery()
        log.info("gateway %s serving: %s", self.gateway_id,
                 ", ".join(f"{name}={host}:{port}" for name, (host, port) in self.addresses.items()))

    def _start_discovery(self) -> None:
        consul_settings = self.config.discovery.consul
        if self.consul is None or consul_settings is None:
            return
        self.supervisor.start("consul-watcher", self.consul.run)
        self.supervisor.start("consul-routes", self._follow_consul_routes)
        registration = consul_settings.registration
        if registration.enabled:
            host, port = self.addresses[self.config.listeners[0].name]
            admin_host, admin_port = self.addresses["admin"]
            self.registrar = Registrar(ConsulClient(consul_settings), registration,
                                       address=registration.address or host, port=registration.port or port,
                                       check_url=f"http://{admin_host}:{admin_port}/readyz",
                                       ready=lambda: next(iter(self.admin.not_ready_reasons()), None))
            self.supervisor.start("consul-register", self.registrar.run)

    async def _follow_consul_routes(self) -> None:
        """File routes first, then tag-driven routes from Consul (a file route's name wins)."""
        assert self.consul is not None
        watch = self.consul.routes
        names = {route.name for route in self.file_routes.routes}
        version = watch.version
        while True:
            if not await watch.changed(version, timeout_s=3600.0):
                continue
            version = watch.version
            discovered: tuple[Route, ...] = tuple(r for r in watch.get() if r.name not in names)
            self.routes.publish(compile_routes(RouteTable(self.file_routes.routes + discovered)))

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish within drain_timeout_s, then close everything."""
        if self.registrar is not None:
            # Out of Consul first, so new traffic goes elsewhere while we drain.
            await self.registrar.deregister()
        self._started = False
        await asyncio.gather(*(runner.cleanup() for runner in self._runners))
        self._runners.clear()
        await self.supervisor.stop()
        if self.registrar is not None:
            await self.registrar.close()
        await self.forwarder.close()


async def run_until_signalled(gateway: Gateway) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await gateway.start()
    failed = loop.create_task(gateway.supervisor.failed.wait())
    stopping = loop.create_task(stop.wait())
    await asyncio.wait({failed, stopping}, return_when=asyncio.FIRST_COMPLETED)
    failed.cancel()
    stopping.cancel()
    log.info("shutting down: draining for up to %ss", gateway.config.drain_timeout_s)
    await gateway.stop()
    if gateway.supervisor.failure:
        log.error("%s", gateway.supervisor.failure)
        return 1
    return 0


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def new_event_loop() -> asyncio.AbstractEventLoop:
    with contextlib.suppress(ImportError):
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        return loop
    return asyncio.new_event_loop()


def serve(config: cfg.GatewayConfig) -> int:
    configure_logging()

    async def main() -> int:
        try:
            gateway = Gateway(config)
            return await run_until_signalled(gateway)
        except StartupError as exc:
            log.error("cannot start: %s", exc)
            return 1

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main())
