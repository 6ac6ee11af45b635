"""Consul Connect CA as identity source, against a fake Consul agent that is a real HTTP server."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from mesh_gateway.identity.ca import CAError
from mesh_gateway.identity.consul_ca import (
    ConsulAgent,
    ConsulCAError,
    ConsulIdentity,
    ConsulSettings,
    fetch_credentials,
)
from mesh_gateway.model import Credentials
from mesh_gateway.watch import Watch
from tests.fakes.consul_ca import FakeConsulCA

TOKEN = "4b3c8d0e-secret"


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


@pytest.fixture
async def consul(tmp_path: Path) -> AsyncIterator[tuple[FakeConsulCA, str]]:
    fake = FakeConsulCA(tmp_path / "consul-ca", token=TOKEN)
    address = await fake.start()
    yield fake, address
    await fake.close()


def agent(address: str, token: str | None = TOKEN, wait_s: float = 5.0) -> ConsulAgent:
    return ConsulAgent(ConsulSettings(address, "gateway", token=token, wait_s=wait_s, retry_initial_s=0.05,
                                      retry_max_s=0.2))


async def test_leaf_fetched_with_token_and_validated(consul: tuple[FakeConsulCA, str]) -> None:
    fake, address = consul
    client = agent(address)
    try:
        creds = await fetch_credentials(client, fake.spiffe_id("gateway"))
    finally:
        await client.close()
    assert str(creds.spiffe_id).endswith(".consul/ns/default/dc/dc1/svc/gateway")
    assert creds.bundle_pem == fake.ca.bundle_pem  # type: ignore[union-attr]
    assert all(token == TOKEN for _, _, token in fake.requests)


async def test_wrong_token_refused(consul: tuple[FakeConsulCA, str]) -> None:
    fake, address = consul
    client = agent(address, token="wrong")
    with pytest.raises(ConsulCAError, match="HTTP 403"):
        await fetch_credentials(client, fake.spiffe_id("gateway"))
    await client.close()


async def test_leaf_for_another_identity_refused(consul: tuple[FakeConsulCA, str]) -> None:
    fake, address = consul
    client = agent(address)
    with pytest.raises(CAError, match="expected exactly"):
        await fetch_credentials(client, fake.spiffe_id("not-the-gateway"))
    await client.close()


async def test_renewal_delivered_by_blocking_query_and_root_rotation(consul: tuple[FakeConsulCA, str]) -> None:
    fake, address = consul
    client = agent(address)
    first = await fetch_credentials(client, fake.spiffe_id("gateway"))
    watch: Watch[Credentials] = Watch(first)
    identity = ConsulIdentity(client, fake.spiffe_id("gateway"), watch, rng=random.Random(1))
    task = asyncio.create_task(identity.run())
    try:
        # wait until the identity is parked in a blocking query on the leaf's current index
        leaf_path = "/v1/agent/connect/ca/leaf/gateway"
        await until(lambda: any(p == leaf_path and q.get("index") == str(fake.leaves["gateway"][1])
                                for p, q, _ in fake.requests))
        renewed = await fake.rotate_leaf("gateway")
        await until(lambda: watch.get().serial == renewed.serial)
        assert watch.get().key_pem == renewed.key_pem
        blocking = [q for p, q, _ in fake.requests if p == leaf_path and "index" in q]
        assert blocking and all(q["wait"] == "5s" for q in blocking)
        assert identity.status().rotations_total == 1 and identity.status().next_refresh_at is None

        await fake.rotate_roots()  # Consul CA root rotation: the roots watch brings the new bundle
        await until(lambda: watch.get().bundle_pem.count(b"BEGIN CERTIFICATE") == 2)
        under_new_root = await fake.rotate_leaf("gateway")
        await until(lambda: watch.get().serial == under_new_root.serial)
        assert watch.get().cert_chain_pem.count(b"BEGIN CERTIFICATE") == 3  # leaf, intermediate, cross
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_agent_failure_keeps_last_good_leaf(consul: tuple[FakeConsulCA, str]) -> None:
    fake, address = consul
    client = agent(address)
    first = await fetch_credentials(client, fake.spiffe_id("gateway"))
    watch: Watch[Credentials] = Watch(first)
    identity = ConsulIdentity(client, fake.spiffe_id("gateway"), watch, rng=random.Random(1))
    fake.fail_with = 500
    task = asyncio.create_task(identity.run())
    try:
        await until(lambda: identity.status().failures_total >= 2)
        assert watch.get() == first and identity.ready()
        assert "HTTP 500" in identity.status().last_error
        fake.fail_with = None
        renewed = await fake.rotate_leaf("gateway")
        await until(lambda: watch.get().serial == renewed.serial)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
