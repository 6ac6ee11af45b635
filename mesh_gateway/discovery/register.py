"""Self-registration: the gateway registers itself with the local Consul agent on start, keeps its check
passing, and deregisters on a clean shutdown (so Consul stops sending traffic before we drain)."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from mesh_gateway.config import ConsulRegister
from mesh_gateway.discovery.blocking import Backoff
from mesh_gateway.discovery.consul_client import ConsulClient, ConsulError

log = logging.getLogger("mesh_gateway.discovery.register")

Readiness = Callable[[], str | None]


def _go(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


def service_definition(settings: ConsulRegister, *, service_id: str, address: str, port: int,
                       check_url: str) -> dict[str, Any]:
    """The body of PUT /v1/agent/service/register. Pure."""
    check: dict[str, Any] = {
        "CheckID": f"service:{service_id}",
        "Name": "mesh-gateway readiness",
        "DeregisterCriticalServiceAfter": _go(settings.deregister_critical_after_s),
    }
    if settings.check == "http":
        check.update(HTTP=check_url, Interval=_go(settings.interval_s), Timeout=_go(min(5.0, settings.interval_s)))
    else:
        check.update(TTL=_go(settings.ttl_s))
    return {"ID": service_id, "Name": settings.service_name, "Address": address, "Port": port,
            "Tags": list(settings.tags), "Meta": dict(settings.meta), "Check": check}


UNSPECIFIED = frozenset({"0.0.0.0", "::", ""})


def default_service_id(settings: ConsulRegister, address: str, port: int) -> str:
    where = address.replace(":", "_") if address else socket.gethostname()
    return settings.service_id or f"{settings.service_name}-{where}-{port}"


def registration_target(settings: ConsulRegister, listener: tuple[str, int],
                        admin: tuple[str, int]) -> tuple[str, int, str]:
    """Address, port and check URL to register. A wildcard listen address is sent as "" so that Consul uses the
    node's address; a wildcard admin address is checked through loopback (the agent runs on the same host)."""
    address = settings.address if settings.address is not None else listener[0]
    address = "" if address in UNSPECIFIED else address
    admin_host = "127.0.0.1" if admin[0] in UNSPECIFIED else admin[0]
    admin_host = f"[{admin_host}]" if ":" in admin_host else admin_host
    return address, settings.port or listener[1], f"http://{admin_host}:{admin[1]}/readyz"


class Registrar:
    def __init__(self, client: ConsulClient, settings: ConsulRegister, *, address: str, port: int, check_url: str,
                 ready: Readiness, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 rng: random.Random | None = None, definition: dict[str, Any] | None = None) -> None:
        """`definition`: a ready-made registration body (a sidecar's service or connect-proxy) instead of the
        gateway's own; its check must be `service:<ID>` as service_definition() makes it."""
        self._client = client
        self._settings = settings
        if definition is None:
            definition = service_definition(settings, service_id=default_service_id(settings, address, port),
                                            address=address, port=port, check_url=check_url)
        self.service_id = str(definition["ID"])
        self._definition = definition
        self._ready = ready
        self._sleep = sleep
        self._backoff = Backoff(0.5, 30.0, rng)
        self.registered = False

    async def _register(self) -> None:
        while True:
            try:
                await self._client.put("/v1/agent/service/register", self._definition,
                                       params={"replace-existing-checks": "true"})
            except ConsulError as exc:
                log.error("consul: cannot register %s: %s", self.service_id, exc)
                await self._sleep(self._backoff.next())
                continue
            self._backoff.reset()
            self.registered = True
            log.info("consul: registered %s (%s check)", self.service_id, self._settings.check)
            return

    async def run(self) -> None:
        """Register, then (TTL check) report readiness every ttl/2; re-register if the agent forgot us."""
        await self._register()
        if self._settings.check != "ttl":
            await asyncio.Event().wait()
        check_id = f"service:{self.service_id}"
        while True:
            reason = self._ready()
            verb = "pass" if reason is None else "fail"
            try:
                await self._client.put(f"/v1/agent/check/{verb}/{check_id}", params={"note": reason or "ready"})
            except ConsulError as exc:
                if exc.status == 404:
                    log.warning("consul: the agent no longer knows %s; registering again", self.service_id)
                    await self._register()
                else:
                    log.warning("consul: TTL update for %s failed: %s", self.service_id, exc)
            await self._sleep(self._settings.ttl_s / 2)

    async def close(self) -> None:
        await self._client.close()

    async def deregister(self, timeout_s: float = 5.0) -> None:
        if not self.registered:
            return
        try:
            await self._client.put(f"/v1/agent/service/deregister/{self.service_id}", timeout_s=timeout_s)
            self.registered = False
            log.info("consul: deregistered %s", self.service_id)
        except ConsulError as exc:
            log.error("consul: deregistration of %s failed (Consul will drop it after %ss critical): %s",
                      self.service_id, self._settings.deregister_critical_after_s, exc)
