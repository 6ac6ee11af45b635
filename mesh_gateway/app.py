"""Composition root: builds everything from GatewayConfig, wires the Watches, supervises, drains on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from pathlib import Path

from aiohttp import web

from mesh_gateway import config as cfg
from mesh_gateway.discovery.static import catalog_from_config, routes_from_config
from mesh_gateway.edges.admin import Admin
from mesh_gateway.edges.http import HttpEdge
from mesh_gateway.identity.ca import CAError, load_ca
from mesh_gateway.identity.tls import ServerTls
from mesh_gateway.model import Catalog, Credentials, SpiffeId
from mesh_gateway.pipeline import AllowAll, Authorizer, Pipeline
from mesh_gateway.routing import CompiledRoutes, compile_routes
from mesh_gateway.supervisor import Supervisor
from mesh_gateway.upstream.h1 import H1Forwarder
from mesh_gateway.upstream.http import HttpForwarder
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
                 reuse_port: bool = False, serve_admin: bool = True) -> None:
        self.config = config
        # Set by workers.py: every worker binds the listeners with SO_REUSEPORT; only one serves the admin port.
        self._reuse_port = reuse_port
        self._serve_admin = serve_admin
        self.gateway_id = SpiffeId.parse(config.identity.spiffe_id)
        try:
            self.ca = load_ca(config.identity.ca_dir)
            first = self.ca.issue_credentials(self.gateway_id, config.identity.ttl, config.identity.dns)
        except CAError as exc:
            raise StartupError(f"identity: {exc}") from None
        self.credentials: Watch[Credentials] = Watch(first)
        self.catalog: Watch[Catalog] = Watch(catalog_from_config(config.catalog))
        self.routes: Watch[CompiledRoutes] = Watch(compile_routes(routes_from_config(config)))
        client = H1Forwarder if config.upstream.client == "h1" else HttpForwarder
        self.forwarder: H1Forwarder | HttpForwarder = client(
            self.credentials, pool_size=config.upstream.pool_size, keepalive_s=config.upstream.keepalive_s)
        if authorizer is None:
            log.warning("authorization is off: every routed request is allowed")
        self.pipeline = Pipeline(routes=self.routes, catalog=self.catalog, authorizer=authorizer or AllowAll(),
                                 forwarder=self.forwarder, gateway_id=lambda: self.gateway_id)
        self.admin = Admin()
        self.admin.readiness.append(self._ready)
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
            sock = bind(listener.address, reuse_port=self._reuse_port)
            site = web.SockSite(runner, sock, ssl_context=server_tls.front if server_tls else None)
            await site.start()
            self._runners.append(runner)
            self.edges.append(edge)
            self.addresses[listener.name] = sock.getsockname()[:2]
        if self._serve_admin:
            admin_runner = web.AppRunner(self.admin.app, access_log=None, shutdown_timeout=1.0)
            await admin_runner.setup()
            admin_sock = bind(self.config.admin.address)
            await web.SockSite(admin_runner, admin_sock).start()
            self._runners.append(admin_runner)
            self.addresses["admin"] = admin_sock.getsockname()[:2]
        self._started = True
        log.info("gateway %s serving: %s", self.gateway_id,
                 ", ".join(f"{name}={host}:{port}" for name, (host, port) in self.addresses.items()))

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish within drain_timeout_s, then close everything."""
        self._started = False
        await asyncio.gather(*(runner.cleanup() for runner in self._runners))
        self._runners.clear()
        await self.supervisor.stop()
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


def serve(config: cfg.GatewayConfig, *, reuse_port: bool = False, serve_admin: bool = True) -> int:
    configure_logging()

    async def main() -> int:
        try:
            gateway = Gateway(config, reuse_port=reuse_port, serve_admin=serve_admin)
            return await run_until_signalled(gateway)
        except StartupError as exc:
            log.error("cannot start: %s", exc)
            return 1

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main())
