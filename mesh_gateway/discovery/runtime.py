"""Everything the gateway runs for Consul, in one object the composition root starts and stops: the watcher, the
merge of tag-driven routes into the file's routes, and self-registration."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from mesh_gateway.config import Consul
from mesh_gateway.discovery.consul import ConsulWatcher
from mesh_gateway.discovery.consul_client import ConsulClient
from mesh_gateway.discovery.register import Readiness, Registrar, registration_target
from mesh_gateway.model import Catalog, Route, RouteTable
from mesh_gateway.routing import CompiledRoutes, compile_routes
from mesh_gateway.watch import Watch

StartTask = Callable[[str, Callable[[], Awaitable[None]]], None]
"""Supervisor.start: a crashed task stops the process with a clear error."""


class ConsulDiscovery:
    def __init__(self, settings: Consul, *, trust_domain: str, static: Catalog, file_routes: RouteTable,
                 routes: Watch[CompiledRoutes]) -> None:
        self._settings = settings
        self.watcher = ConsulWatcher(ConsulClient(settings), trust_domain=trust_domain, static=static)
        self.catalog: Watch[Catalog] = self.watcher.catalog
        self._file_routes = file_routes
        self._routes = routes
        self.registrar: Registrar | None = None

    def start(self, start_task: StartTask, *, listener: tuple[str, int], admin: tuple[str, int],
              ready: Readiness) -> None:
        """Called once the listeners are bound, so registration knows the real ports."""
        start_task("consul-watcher", self.watcher.run)
        start_task("consul-routes", self._follow_routes)
        registration = self._settings.registration
        if registration.enabled:
            address, port, check_url = registration_target(registration, listener, admin)
            self.registrar = Registrar(ConsulClient(self._settings), registration, address=address, port=port,
                                       check_url=check_url, ready=ready)
            start_task("consul-register", self.registrar.run)

    async def deregister(self) -> None:
        """Out of Consul first, so that new traffic goes elsewhere while the gateway drains."""
        if self.registrar is not None:
            await self.registrar.deregister()

    async def close(self) -> None:
        if self.registrar is not None:
            await self.registrar.close()

    async def _follow_routes(self) -> None:
        """File routes first, then tag-driven routes from Consul (a file route's name wins)."""
        watch = self.watcher.routes
        names = {route.name for route in self._file_routes.routes}
        version = watch.version
        while True:
            if not await watch.changed(version, timeout_s=3600.0):
                continue
            version = watch.version
            discovered: tuple[Route, ...] = tuple(r for r in watch.get() if r.name not in names)
            self._routes.publish(compile_routes(RouteTable(self._file_routes.routes + discovered)))
