"""Helpers for the Consul tests: watcher configs, waiting on Watches and conditions with bounded deadlines."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from mesh_gateway.config import Consul
from mesh_gateway.discovery.consul import ConsulWatcher
from mesh_gateway.discovery.consul_client import ConsulClient
from mesh_gateway.watch import Watch
from tests.fakes.consul import FakeConsul
from tests.support import TRUST_DOMAIN, WEB_ID

T = TypeVar("T")


def consul_settings(fake: FakeConsul, **overrides: Any) -> Consul:
    data: dict[str, Any] = {"address": fake.url.split("://")[1], "scheme": fake.url.split("://")[0],
                            "wait_s": 60, "retry_base_s": 0.01, "retry_max_s": 0.05, "rate_limit_per_s": 100,
                            "services": [{"name": "web"}], "watch_tagged": False}
    data.update(overrides)
    return Consul.model_validate(data)


@contextlib.asynccontextmanager
async def watching(settings: Consul, **kwargs: Any) -> AsyncIterator[ConsulWatcher]:
    watcher = ConsulWatcher(ConsulClient(settings), trust_domain=TRUST_DOMAIN, **kwargs)
    task = asyncio.create_task(watcher.run())
    try:
        yield watcher
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(watch: Watch[T], predicate: Callable[[T], bool], timeout_s: float = 5.0) -> T:
    """The first published value that satisfies `predicate`, waiting on the Watch itself (no polling)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        version = watch.version
        value = watch.get()
        if predicate(value):
            return value
        remaining = deadline - loop.time()
        assert remaining > 0, f"condition not reached within {timeout_s}s; last value: {value!r}"
        await watch.changed(version, remaining)


async def eventually(condition: Callable[[], Any], timeout_s: float = 5.0) -> Any:
    """Poll a condition that has no Watch (fake state, watcher status) until true, within a bounded deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert loop.time() < deadline, f"condition not reached within {timeout_s}s"
        await asyncio.sleep(0.01)


def ports(catalog: Any, service: str = "web") -> list[int]:
    endpoints = catalog.get(service)
    return [e.port for e in endpoints.endpoints] if endpoints is not None else []


def register_sidecar(fake: FakeConsul, service_id: str, port: int, *, status: str = "passing",
                     spiffe_id: str = WEB_ID, name: str = "web") -> None:
    """A mesh instance as Consul shows it after `connect { sidecar_service {} }`: the app plus its proxy."""
    fake.register(name, 9000 + port % 1000, service_id=service_id, meta={"spiffe_id": spiffe_id}, status=status)
    fake.register(f"{name}-sidecar-proxy", port, service_id=f"{service_id}-sidecar-proxy", kind="connect-proxy",
                  meta={"spiffe_id": spiffe_id},
                  proxy={"DestinationServiceName": name, "DestinationServiceID": service_id},
                  checks=[{"Name": "alias", "AliasService": service_id}])
