"""A sidecar in Consul: the local service and the sidecar itself as its `connect-proxy`, so that Connect-aware
clients (the gateway with `mode: connect`, other sidecars, Consul's own tooling) find the sidecar's mTLS port for the
service and the SPIFFE ID to expect there (`Meta.spiffe_id`). Registration bodies are built here, purely; the
Registrar from discovery/register.py keeps them alive and removes them on shutdown."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from typing import Any

from mesh_gateway.config import ConsulRegister
from mesh_gateway.discovery.consul import ConsulWatcher
from mesh_gateway.discovery.consul_client import ConsulClient
from mesh_gateway.discovery.register import Readiness, Registrar, registration_target, service_definition
from mesh_gateway.model import Catalog
from mesh_gateway.sidecar_config import SidecarConfig
from mesh_gateway.watch import Watch


def connect_registrations(config: SidecarConfig, settings: ConsulRegister, *, inbound: tuple[str, int],
                          admin: tuple[str, int]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(service, proxy): PUT /v1/agent/service/register bodies. Both carry the service's SPIFFE ID in Meta; the
    proxy names its destination (Proxy.DestinationServiceName/ID) and where the app listens (LocalServicePort)."""
    name = config.service.name
    address, port, check_url = registration_target(settings, inbound, admin)
    where = address.replace(":", "_") if address else socket.gethostname()
    service_id = f"{name}-{where}-{port}"
    meta = {**settings.meta, "spiffe_id": config.identity.spiffe_id}
    service = service_definition(settings, service_id=service_id, address=address, port=config.service.port,
                                 check_url=check_url)
    service.update(Name=name, Meta=meta)
    service["Check"]["Name"] = f"{name}: local app accepts connections (probed by its sidecar)"
    proxy = service_definition(settings, service_id=f"{service_id}-sidecar-proxy", address=address, port=port,
                               check_url=check_url)
    proxy.update(Kind="connect-proxy", Name=f"{name}-sidecar-proxy", Meta=meta, Proxy={
        "DestinationServiceName": name,
        "DestinationServiceID": service_id,
        "LocalServiceAddress": config.service.address,
        "LocalServicePort": config.service.port,
    })
    proxy["Check"]["Name"] = f"{name}-sidecar-proxy readiness"
    return service, proxy


class SidecarConsul:
    """The sidecar's Consul: a watcher for the outbound services (whole snapshots, last-known-good, as the
    gateway's) and, when registration is on, the two registrations kept alive by their own Registrars."""

    def __init__(self, config: SidecarConfig, static: Catalog) -> None:
        assert config.consul is not None
        self._config = config
        self._settings = config.consul
        self.watcher = ConsulWatcher(ConsulClient(config.consul), trust_domain=config.trust_domain, static=static)
        self.catalog: Watch[Catalog] = self.watcher.catalog
        self.registrars: list[Registrar] = []

    def start(self, start_task: Callable[[str, Callable[[], Awaitable[None]]], None], *, inbound: tuple[str, int],
              admin: tuple[str, int], app_ready: Readiness, sidecar_ready: Readiness) -> None:
        """Once the listeners are bound (registration needs the real ports)."""
        start_task("consul-watcher", self.watcher.run)
        registration = self._settings.registration
        if not registration.enabled:
            return
        service, proxy = connect_registrations(self._config, registration, inbound=inbound, admin=admin)
        for definition, ready in ((service, app_ready), (proxy, sidecar_ready)):
            registrar = Registrar(ConsulClient(self._settings), registration, address="", port=0, check_url="",
                                  ready=ready, definition=definition)
            self.registrars.append(registrar)
            start_task(f"consul-register-{definition['ID']}", registrar.run)

    async def deregister(self) -> None:
        """The proxy first, so that callers stop picking this sidecar before the service entry goes."""
        for registrar in reversed(self.registrars):
            await registrar.deregister()

    async def close(self) -> None:
        for registrar in self.registrars:
            await registrar.close()
