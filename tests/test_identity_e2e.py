"""End to end through the real gateway: SVID rotation under load, /certs, and root rotation with cross-signing."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web

from mesh_gateway.identity.ca import CertificateAuthority, cert_pem, load_ca
from mesh_gateway.identity.ca_rotation import prune_roots, rotate_root
from mesh_gateway.identity.tls import server_context
from mesh_gateway.model import Credentials
from tests.support import CLIENT_ID, WEB_ID, admin_url, client_ssl, gateway_config, issue, running, url


@dataclass
class SerialUpstream:
    """An mTLS upstream that answers with the serial of the client certificate the caller presented."""

    runner: web.AppRunner
    port: int
    serials: list[str] = field(default_factory=list)


async def start_serial_upstream(creds: Credentials) -> SerialUpstream:
    async def handle(request: web.Request) -> web.Response:
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        serial = ssl_object.getpeercert()["serialNumber"].lower() if ssl_object else ""
        return web.json_response({"caller_serial": serial})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    context = server_context(creds.cert_chain_pem, creds.key_pem, client_auth="required",
                             client_ca_pem=creds.bundle_pem)
    await web.SockSite(runner, sock, ssl_context=context).start()
    return SerialUpstream(runner, sock.getsockname()[1])


@pytest.fixture
async def serial_upstream(ca: CertificateAuthority) -> AsyncIterator[SerialUpstream]:
    upstream = await start_serial_upstream(issue(ca, WEB_ID))
    yield upstream
    await upstream.runner.cleanup()


def catalog(port: int) -> dict[str, list[dict[str, object]]]:
    return {"web": [{"address": "127.0.0.1", "port": port, "spiffe_id": WEB_ID}]}


async def _append(items: list[int]) -> None:
    items.append(1)


async def until(condition: Callable[[], Any], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def certs(gw: Any) -> dict[str, Any]:
    async with aiohttp.ClientSession() as admin, admin.get(admin_url(gw, "/certs")) as resp:
        assert resp.status == 200
        return dict(await resp.json())


LOAD_TTL_S = 3.0  # renewals every ~1.5 s: ≥ 4 rotations in well under the test's run time
LOAD_DURATION_S = 12.0


async def test_rotation_under_load_drops_nothing(ca, ca_dir, serial_upstream, client_creds):
    config = gateway_config(ca_dir, catalog(serial_upstream.port), client_auth="required")
    context = client_ssl(ca.bundle_pem, client_creds)
    failures: list[str] = []
    edge_serials: set[str] = set()
    upstream_serials: set[str] = set()
    counts = {"keepalive": 0, "fresh": 0}
    async with running(config, identity_ttl_s=LOAD_TTL_S) as gw:
        deadline = time.monotonic() + LOAD_DURATION_S

        async def keepalive_client() -> None:
            # one connection for the whole run: it was established before every rotation and must keep working
            connections = []
            trace = aiohttp.TraceConfig()
            trace.on_connection_create_end.append(lambda *_: _append(connections))
            connector = aiohttp.TCPConnector(limit=1, ssl=context)
            async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as session:
                while time.monotonic() < deadline:
                    try:
                        async with session.get(url(gw, "/load")) as resp:
                            body = await resp.json()
                            if resp.status != 200:
                                failures.append(f"keep-alive: HTTP {resp.status}")
                            else:
                                upstream_serials.add(body["caller_serial"])
                                counts["keepalive"] += 1
                    except (aiohttp.ClientError, OSError) as exc:
                        failures.append(f"keep-alive: {type(exc).__name__}: {exc}")
            assert len(connections) == 1  # really one connection, kept alive across every rotation

        async def fresh_client() -> None:
            # a new TLS handshake each time: sees whichever edge certificate is current
            while time.monotonic() < deadline:
                try:
                    async with httpx.AsyncClient(verify=context) as fresh, fresh.stream("GET", url(gw, "/f")) as resp:
                        ssl_object = resp.extensions["network_stream"].get_extra_info("ssl_object")
                        edge_serials.add(str(ssl_object.getpeercert()["serialNumber"]).lower())
                        body = json.loads(await resp.aread())
                        if resp.status_code != 200:
                            failures.append(f"fresh: HTTP {resp.status_code}")
                        else:
                            upstream_serials.add(body["caller_serial"])
                            counts["fresh"] += 1
                except (httpx.HTTPError, OSError) as exc:
                    failures.append(f"fresh: {type(exc).__name__}: {exc}")
                await asyncio.sleep(0.1)

        await asyncio.gather(keepalive_client(), fresh_client())
        status = gw.identity.status()
        async with aiohttp.ClientSession() as admin, admin.get(admin_url(gw, "/metrics")) as resp:
            metrics = await resp.text()
    assert failures == []
    assert counts["keepalive"] > 50 and counts["fresh"] > 20
    assert status.rotations_total >= 4
    assert len(edge_serials) >= 4, edge_serials  # the edge certificate rotated under the listener
    assert len(upstream_serials) >= 4, upstream_serials  # and so did the client certificate shown upstream
    rotated = [line for line in metrics.splitlines()
               if line.startswith('mesh_gateway_cert_rotations_total{result="success"}')]
    assert rotated and float(rotated[0].split()[-1]) >= status.rotations_total
    assert 'mesh_gateway_cert_expiry_seconds{kind="intermediate"}' in metrics


async def test_certs_view_tells_the_truth(ca, ca_dir, serial_upstream, client_creds):
    config = gateway_config(ca_dir, catalog(serial_upstream.port))
    async with running(config) as gw:
        async with httpx.AsyncClient(verify=client_ssl(ca.bundle_pem, client_creds)) as client, \
                client.stream("GET", url(gw, "/x")) as resp:
            ssl_object = resp.extensions["network_stream"].get_extra_info("ssl_object")
            serial = str(ssl_object.getpeercert()["serialNumber"]).lower()
            caller = json.loads(await resp.aread())["caller_serial"]
        view = await certs(gw)
    svid = view["svid"]
    assert int(svid["serial"], 16) == int(serial, 16) == int(caller, 16)
    assert svid["spiffe_id"] == config.identity.spiffe_id
    not_before = dt.datetime.fromisoformat(svid["not_before"])
    not_after = dt.datetime.fromisoformat(svid["not_after"])
    refresh = dt.datetime.fromisoformat(svid["next_refresh"])
    assert not_before < refresh < not_after
    assert 3500 < svid["seconds_to_expiry"] <= 3600
    assert [r["sha256"] for r in view["bundle"]] and len(view["bundle"]) == 1
    assert view["bundle"][0]["seconds_to_expiry"] > 365 * 86400
    assert view["issuer"] == "local" and view["ready"] is True and view["last_error"] is None


async def test_root_rotation_overlap_then_prune(ca, ca_dir, serial_upstream, tmp_path):
    old_bundle = ca.bundle_pem
    old_client = issue(ca, CLIENT_ID)  # a client that holds an old-root leaf and trusts only the old root
    config = gateway_config(ca_dir, catalog(serial_upstream.port), client_auth="required",
                            routes=[{"name": "api", "match": {"path_prefix": "/api"}, "service": "web"}])
    config = config.model_copy(update={"identity": config.identity.model_copy(update={"bundle_poll_s": 0.1})})
    async with running(config, identity_ttl_s=4.0) as gw, aiohttp.ClientSession() as client:
        rotated = rotate_root(ca_dir, max_leaf_ttl_s=3600)

        async def new_root_in_use() -> bool:
            view = await certs(gw)
            return len(view["bundle"]) == 2 and view["svid"]["chain_length"] == 3

        await until(new_root_in_use)  # bundle followed, and the SVID now comes from the new root (with cross)

        # overlap: the old-root client verifies the gateway through the cross certificate, and is accepted;
        # the old-root upstream accepts the gateway's new-root client certificate the same way
        async with client.get(url(gw, "/api/x"), ssl=client_ssl(old_bundle, old_client)) as resp:
            assert resp.status == 200

        now = dt.datetime.now(dt.UTC)
        assert prune_roots(ca_dir, now + dt.timedelta(seconds=7200))

        async def pruned() -> bool:
            return len((await certs(gw))["bundle"]) == 1

        await until(pruned)
        both = old_bundle + cert_pem(rotated.roots[1])  # trusts the gateway either way: only our cert is at issue
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, OSError)):
            async with client.get(url(gw, "/nothing"), ssl=client_ssl(both, old_client)) as resp:
                await resp.read()
        new_client = issue(load_ca(ca_dir), CLIENT_ID)
        async with client.get(url(gw, "/nothing"), ssl=client_ssl(new_client.bundle_pem, new_client)) as resp:
            assert resp.status == 404  # TLS accepted; the gateway itself answers (no route)
            assert json.loads(await resp.read())["error"]
