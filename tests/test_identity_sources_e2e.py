"""The gateway with its SVID from the remote issuer (`ca serve`) and from Consul's Connect CA, end to end."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import httpx

from mesh_gateway.app import prepare_identity
from mesh_gateway.config import RemoteIssuer
from mesh_gateway.identity.issuer_api import IssuerServer, IssuerSettings
from mesh_gateway.identity.local_issuer import LocalIssuer
from mesh_gateway.identity.tls import peer_spiffe_id
from mesh_gateway.model import SpiffeId
from tests.fakes.consul_ca import FakeConsulCA
from tests.support import GATEWAY_ID, WEB_ID, admin_url, client_ssl, gateway_config, issue, running, url
from tests.test_identity_e2e import start_serial_upstream


async def until(condition: Callable[[], Any], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def certs(gw: Any) -> dict[str, Any]:
    async with aiohttp.ClientSession() as admin, admin.get(admin_url(gw, "/certs")) as resp:
        return dict(await resp.json())


async def edge_serial_and_status(gw: Any, context: Any) -> tuple[int, int, dict[str, Any]]:
    async with httpx.AsyncClient(verify=context) as client, client.stream("GET", url(gw, "/x")) as resp:
        ssl_object = resp.extensions["network_stream"].get_extra_info("ssl_object")
        assert peer_spiffe_id(ssl_object) == gw.gateway_id
        body = json.loads(await resp.aread())
        return resp.status_code, int(ssl_object.getpeercert()["serialNumber"], 16), body


async def test_gateway_bootstraps_from_issuer_with_token_and_renews_over_mtls(ca, ca_dir, tmp_path, client_creds):
    server = IssuerServer(LocalIssuer(ca_dir), IssuerSettings(address="127.0.0.1:0", bootstrap_address="127.0.0.1:0",
                                                              sign_per_minute=600, sign_burst=20,
                                                              allowed_dns=("localhost", "127.0.0.1")))
    await server.start()
    upstream = await start_serial_upstream(issue(ca, WEB_ID))
    try:
        token_file = tmp_path / "join-token"
        token_file.write_text(server.tokens.create(SpiffeId.parse(GATEWAY_ID), 900) + "\n")
        config = gateway_config(ca_dir, {"web": [{"address": "127.0.0.1", "port": upstream.port,
                                                  "spiffe_id": WEB_ID}]})
        remote = RemoteIssuer(address=f"127.0.0.1:{server.port}",
                              bootstrap_address=f"127.0.0.1:{server.bootstrap_port}", join_token_file=token_file)
        identity = config.identity.model_copy(update={"issuer": "remote", "remote": remote})
        config = config.model_copy(update={"identity": identity})
        first = await prepare_identity(config, ttl_s=3)
        assert first is not None and str(first.spiffe_id) == GATEWAY_ID
        async with running(config, credentials=first, identity_ttl_s=3) as gw:
            context = client_ssl(ca.bundle_pem, client_creds)
            status, serial, body = await edge_serial_and_status(gw, context)
            assert status == 200 and serial == first.serial

            async def renewed_twice() -> bool:
                return int((await certs(gw))["rotations_total"]) >= 2

            await until(renewed_twice)  # the token was single use: these renewals went over mTLS
            view = await certs(gw)
            assert view["issuer"] == "remote" and view["failures_total"] == 0
            status, serial, body = await edge_serial_and_status(gw, context)
            assert status == 200 and serial == int(view["svid"]["serial"], 16) != first.serial
            assert int(body["caller_serial"], 16) == serial
    finally:
        await upstream.runner.cleanup()
        await server.stop(0)


async def test_gateway_with_consul_connect_ca_identity(tmp_path):
    fake = FakeConsulCA(tmp_path / "consul-ca", token="acl-secret")
    address = await fake.start()
    assert fake.ca is not None
    web_id, gateway_id = fake.spiffe_id("web"), fake.spiffe_id("gateway")
    upstream = await start_serial_upstream(fake.ca.issue_credentials(web_id, 3600))  # like an Envoy sidecar's
    try:
        config = gateway_config(
            tmp_path / "unused", {"web": [{"address": "127.0.0.1", "port": upstream.port, "spiffe_id": str(web_id)}]},
            trust_domain=fake.trust_domain,
            identity={"spiffe_id": str(gateway_id), "provider": "consul", "dns": ["localhost", "127.0.0.1"],
                      "consul": {"address": address, "service": "gateway", "token": "acl-secret", "wait_s": 30}})
        first = await prepare_identity(config)
        assert first is not None and first.spiffe_id == gateway_id
        client = fake.ca.issue_credentials(fake.spiffe_id("client"), 3600, dns=())
        context = client_ssl(fake.ca.bundle_pem, client)
        # Consul leaves carry no host names: mesh clients (like Envoy) check the SPIFFE ID instead, below
        context.check_hostname = False
        async with running(config, credentials=first) as gw:
            status, serial, body = await edge_serial_and_status(gw, context)
            assert status == 200 and serial == first.serial == int(body["caller_serial"], 16)
            renewed = await fake.rotate_leaf("gateway")  # the agent renews: the blocking query returns

            async def picked_up() -> bool:
                return int((await certs(gw))["svid"]["serial"], 16) == renewed.serial

            await until(picked_up)
            status, serial, body = await edge_serial_and_status(gw, context)
            assert status == 200 and serial == renewed.serial == int(body["caller_serial"], 16)
            view = await certs(gw)
            assert view["issuer"].startswith("consul") and view["svid"]["next_refresh"] is None
        assert all(token == "acl-secret" for _, _, token in fake.requests)
        assert any("index" in query for path, query, _ in fake.requests if path.endswith("/leaf/gateway"))
    finally:
        await upstream.runner.cleanup()
        await fake.close()
