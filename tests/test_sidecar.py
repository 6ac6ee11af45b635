"""Sidecar mode in one process: real sockets, real TLS from our CA, the demo apps behind real sidecars."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import grpc.aio
import pytest

from mesh_gateway.cli import main
from mesh_gateway.config import ConfigError
from mesh_gateway.demo.apps import RunningApp, inventory_app, orders_app, start_app
from mesh_gateway.errors import NotFound
from mesh_gateway.model import RequestInfo
from mesh_gateway.sidecar import Sidecar, first_svid
from mesh_gateway.sidecar_config import SidecarConfig, parse
from mesh_gateway.sidecar_consul import connect_registrations
from mesh_gateway.sidecar_routing import service_addressing
from tests.grpc_support import ECHO_ID, start_echo_upstream
from tests.support import CLIENT_ID, GATEWAY_ID, client_ssl, issue

ORDERS_ID = "spiffe://mesh.local/ns/default/sa/orders"
INVENTORY_ID = "spiffe://mesh.local/ns/default/sa/inventory"


def sidecar_config(ca_dir: Path, name: str, spiffe_id: str, app_port: int, **extra: Any) -> SidecarConfig:
    data: dict[str, Any] = {
        "trust_domain": "mesh.local",
        "service": {"name": name, "port": app_port},
        "identity": {"spiffe_id": spiffe_id, "ca_dir": str(ca_dir)},
        "inbound": {"address": "127.0.0.1:0"},
        "outbound": {"address": "127.0.0.1:0"},
        "admin": {"address": "127.0.0.1:0"},
        "drain_timeout_s": 1,
    }
    data.update(extra)
    return parse(data)


def loopback_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.setblocking(False)
    return sock


@contextlib.asynccontextmanager
async def running_sidecar(config: SidecarConfig) -> AsyncIterator[Sidecar]:
    sidecar = Sidecar(config, await first_svid(config))
    await sidecar.start()
    try:
        yield sidecar
    finally:
        await sidecar.stop()


@contextlib.asynccontextmanager
async def app(web_app: Any) -> AsyncIterator[RunningApp]:
    running = await start_app(web_app, loopback_socket())
    try:
        yield running
    finally:
        await running.close()


def inbound_url(sidecar: Sidecar, path: str) -> str:
    host, port = sidecar.addresses["inbound"]
    return f"https://{host}:{port}{path}"


def outbound_url(sidecar: Sidecar, path: str) -> str:
    host, port = sidecar.addresses["outbound"]
    return f"http://{host}:{port}{path}"


def mesh_client_ssl(bundle_pem: bytes, creds: Any) -> ssl.SSLContext:
    """A mesh peer calling a sidecar: verifies the chain; identity is the SPIFFE ID, not a host name."""
    context = client_ssl(bundle_pem, creds)
    context.check_hostname = False
    return context


async def test_inbound_forwards_to_local_app_with_caller_identity(ca, ca_dir):
    async with app(inventory_app()) as inventory, \
            running_sidecar(sidecar_config(ca_dir, "inventory", INVENTORY_ID, inventory.port)) as sidecar, \
            aiohttp.ClientSession() as client:
        tls = mesh_client_ssl(ca.bundle_pem, issue(ca, ORDERS_ID))
        async with client.get(inbound_url(sidecar, "/items/apple"), ssl=tls) as resp:
            assert resp.status == 200
            body = await resp.json()
    assert body["caller"] == ORDERS_ID and body["in_stock"] == 12
    assert body["traceparent"].startswith("00-"), "the sidecar continues (here: starts) the trace to the app"


async def test_inbound_refuses_a_client_without_a_mesh_certificate(ca, ca_dir):
    async with app(inventory_app()) as inventory, \
            running_sidecar(sidecar_config(ca_dir, "inventory", INVENTORY_ID, inventory.port)) as sidecar, \
            aiohttp.ClientSession() as client:
        with pytest.raises(aiohttp.ClientError):
            async with client.get(inbound_url(sidecar, "/items"),
                                  ssl=mesh_client_ssl(ca.bundle_pem, None)) as resp:
                await resp.read()


async def test_inbound_allowed_peers_deny_other_identities(ca, ca_dir):
    config = sidecar_config(ca_dir, "inventory", INVENTORY_ID, 1, inbound={
        "address": "127.0.0.1:0", "allowed_peers": [ORDERS_ID]})
    async with app(inventory_app()) as inventory:
        config = config.model_copy(update={"service": config.service.model_copy(update={"port": inventory.port})})
        async with running_sidecar(config) as sidecar, aiohttp.ClientSession() as client:
            for caller, expected in ((CLIENT_ID, 403), (ORDERS_ID, 200)):
                tls = mesh_client_ssl(ca.bundle_pem, issue(ca, caller))
                async with client.get(inbound_url(sidecar, "/items"), ssl=tls) as resp:
                    assert resp.status == expected, caller


async def test_orders_calls_inventory_through_both_sidecars(ca, ca_dir):
    """orders app → its sidecar's outbound → mTLS → inventory sidecar → inventory app, identities checked."""
    async with app(inventory_app()) as inventory, \
            running_sidecar(sidecar_config(ca_dir, "inventory", INVENTORY_ID, inventory.port)) as inv_sidecar:
        inv_host, inv_port = inv_sidecar.addresses["inbound"]
        orders_sock = loopback_socket()
        orders_port = orders_sock.getsockname()[1]
        config = sidecar_config(ca_dir, "orders", ORDERS_ID, orders_port, catalog={"static": {"inventory": [
            {"address": inv_host, "port": inv_port, "spiffe_id": INVENTORY_ID}]}})
        async with running_sidecar(config) as orders_sidecar:
            web_app = orders_app(outbound_url(orders_sidecar, "/inventory"))
            orders = await start_app(web_app, orders_sock)
            try:
                async with aiohttp.ClientSession() as client:
                    tls = mesh_client_ssl(ca.bundle_pem, issue(ca, GATEWAY_ID))
                    async with client.get(inbound_url(orders_sidecar, "/orders/apple"), ssl=tls) as resp:
                        assert resp.status == 200
                        body = await resp.json()
                    async with client.get(outbound_url(orders_sidecar, "/nosuch/x")) as resp:
                        assert resp.status == 404
            finally:
                await orders.close()
    assert body["caller"] == GATEWAY_ID
    assert body["accepted"] is True
    assert body["inventory"]["caller"] == ORDERS_ID


async def test_outbound_refuses_an_instance_with_the_wrong_identity(ca, ca_dir):
    async with app(inventory_app()) as inventory, \
            running_sidecar(sidecar_config(ca_dir, "inventory", INVENTORY_ID, inventory.port)) as impostor:
        host, port = impostor.addresses["inbound"]
        config = sidecar_config(ca_dir, "orders", ORDERS_ID, 1, catalog={"static": {"payments": [
            {"address": host, "port": port, "spiffe_id": "spiffe://mesh.local/ns/default/sa/payments"}]}})
        async with running_sidecar(config) as orders_sidecar, aiohttp.ClientSession() as client:
            async with client.get(outbound_url(orders_sidecar, "/payments/items")) as resp:
                assert resp.status == 502
                assert (await resp.json())["error"] == "upstream identity rejected"


@pytest.mark.parametrize(("path", "query", "host", "routed"), [
    ("/inventory/items/apple", "", "inventory", "/items/apple"),
    ("/inventory", "a=1", "inventory", "/"),
    ("/Inventory/", "", "inventory", "/"),
    ("/inventory//x", "", "inventory", "//x"),
])
def test_service_addressing(path, query, host, routed):
    info = RequestInfo(method="GET", path=path, query=query, host="127.0.0.1:15001", scheme="http", headers=(),
                       client_address="127.0.0.1", client_port=1, request_id="r")
    out = service_addressing(info)
    assert (out.host, out.path, out.query) == (host, routed, query)


def test_service_addressing_without_a_service_is_404():
    info = RequestInfo(method="GET", path="/", query="", host="h", scheme="http", headers=(),
                       client_address="127.0.0.1", client_port=1, request_id="r")
    with pytest.raises(NotFound) as raised:
        service_addressing(info)
    assert raised.value.public_message == "address mesh services as /<service>/<path>"


@pytest.mark.parametrize(("patch", "message"), [
    ({"service": {"name": "orders", "port": 8080, "address": "10.0.0.5"}},
     "service.address: must be a loopback address (127.0.0.1, ::1 or localhost)"),
    ({"outbound": {"address": "0.0.0.0:15001"}},
     "outbound.address: must be a loopback address: the outbound listener lends the service's identity"),
    ({"identity": {"spiffe_id": "spiffe://other.org/x"}}, "identity.spiffe_id: must be in trust domain 'mesh.local'"),
    ({"catalog": {"static": {"inventory": [{"address": "127.0.0.1", "port": 1, "tls": "plain"}]}}},
     "catalog.static.inventory[0].tls: outbound mesh services must use mtls"),
    ({"authz": {"engine": "opa"}}, "authz.opa: required when engine is 'opa'"),
    ({"extra": 1}, "extra: unknown key"),
])
def test_config_errors_name_the_key(patch, message):
    data: dict[str, Any] = {"trust_domain": "mesh.local", "service": {"name": "orders", "port": 8080},
                            "identity": {"spiffe_id": ORDERS_ID}}
    data.update(patch)
    with pytest.raises(ConfigError) as raised:
        parse(data)
    assert any(line.startswith(message) for line in raised.value.errors), raised.value.errors


def test_sidecar_command_reports_config_errors_by_key(tmp_path, capsys):
    path = tmp_path / "sidecar.yaml"
    path.write_text("trust_domain: mesh.local\nservice: {name: orders, port: 8080, address: 10.1.2.3}\n"
                    f"identity: {{spiffe_id: {ORDERS_ID}}}\n")
    assert main(["sidecar", "-c", str(path)]) == 2
    assert "service.address: must be a loopback address" in capsys.readouterr().err
    assert main(["check", "-c", str(path)]) == 2


def test_sidecar_without_a_ca_fails_to_start_with_a_clear_message(tmp_path, caplog):
    path = tmp_path / "sidecar.yaml"
    path.write_text("trust_domain: mesh.local\nservice: {name: orders, port: 8080}\n"
                    f"identity: {{spiffe_id: {ORDERS_ID}, ca_dir: nowhere}}\n"
                    "inbound: {address: '127.0.0.1:0'}\noutbound: {address: '127.0.0.1:0'}\n"
                    "admin: {address: '127.0.0.1:0'}\n")
    assert main(["sidecar", "-c", str(path)]) == 1
    assert f"cannot start: identity (local/local): {tmp_path / 'nowhere'} is not a CA directory" in caplog.text


async def test_grpc_service_behind_the_sidecar(ca, ca_dir, protos):
    """protocol grpc: mTLS gRPC in, the peer checked, plaintext gRPC to the app; a caller not allowed gets
    PERMISSION_DENIED and the app sees nothing."""
    pb, pb_grpc = protos
    echo = await start_echo_upstream(pb, pb_grpc, None)
    config = sidecar_config(ca_dir, "echo", ECHO_ID, echo.port, inbound={
        "address": "127.0.0.1:0", "allowed_peers": [ORDERS_ID]})
    config = config.model_copy(update={"service": config.service.model_copy(update={"protocol": "grpc"})})
    try:
        async with running_sidecar(config) as sidecar:
            target = sidecar.addresses["inbound"]
            channel, stub_ = stub_for(target, ca.bundle_pem, issue(ca, ORDERS_ID), pb_grpc)
            async with channel:
                answer = await stub_.Unary(pb.Msg(text="hi"), timeout=10)
            assert answer.text == "HI"
            assert answer.metadata["x-forwarded-client-cert"] == f"By={ECHO_ID};URI={ORDERS_ID}"
            assert echo.calls == ["Unary"]
            channel, stub_ = stub_for(target, ca.bundle_pem, issue(ca, CLIENT_ID), pb_grpc)
            async with channel:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub_.Unary(pb.Msg(text="hi"), timeout=10)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert echo.calls == ["Unary"]
    finally:
        await echo.close()


def stub_for(address: tuple[str, int], bundle_pem: bytes, creds: Any, pb_grpc: Any) -> tuple[Any, Any]:
    channel_creds = grpc.ssl_channel_credentials(bundle_pem, creds.key_pem, creds.cert_chain_pem)
    # grpc's client checks a host name; the sidecar's SVID carries `localhost` (identity.dns' default).
    channel = grpc.aio.secure_channel(f"{address[0]}:{address[1]}", channel_creds,
                                      options=[("grpc.ssl_target_name_override", "localhost")])
    return channel, pb_grpc.EchoStub(channel)


async def test_readiness_follows_the_local_app(ca, ca_dir):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound, not yet listening: connections are refused
    config = sidecar_config(ca_dir, "orders", ORDERS_ID, sock.getsockname()[1])
    config = config.model_copy(update={"service": config.service.model_copy(update={"probe_interval_s": 0.05})})
    try:
        async with running_sidecar(config) as sidecar, aiohttp.ClientSession() as client:
            host, port = sidecar.addresses["admin"]

            async def readiness() -> tuple[int, Any]:
                async with client.get(f"http://{host}:{port}/readyz") as resp:
                    return resp.status, await resp.json()

            status, body = await readiness()
            assert status == 503
            assert body["reasons"][0].startswith(f"local app at 127.0.0.1:{sock.getsockname()[1]} does not accept")
            sock.listen(8)
            async with asyncio.timeout(10):
                while (await readiness())[0] != 200:
                    await asyncio.sleep(0.02)
    finally:
        sock.close()


def test_connect_registrations_describe_the_service_and_its_proxy():
    config = parse({"trust_domain": "mesh.local", "service": {"name": "orders", "port": 8080},
                    "identity": {"spiffe_id": ORDERS_ID},
                    "consul": {"registration": {"enabled": True, "check": "ttl", "ttl_s": "15s", "address": "10.0.0.7",
                                                "tags": ["v1"]}}})
    assert config.consul is not None
    service, proxy = connect_registrations(config, config.consul.registration, inbound=("0.0.0.0", 15443),
                                           admin=("127.0.0.1", 15000))
    assert service["Name"] == "orders" and service["Port"] == 8080 and service["Address"] == "10.0.0.7"
    assert proxy["Kind"] == "connect-proxy" and proxy["Name"] == "orders-sidecar-proxy" and proxy["Port"] == 15443
    assert proxy["Proxy"] == {"DestinationServiceName": "orders", "DestinationServiceID": service["ID"],
                              "LocalServiceAddress": "127.0.0.1", "LocalServicePort": 8080}
    assert service["Meta"]["spiffe_id"] == proxy["Meta"]["spiffe_id"] == ORDERS_ID
    assert proxy["Check"]["TTL"] == "15000ms" and proxy["Check"]["CheckID"] == f"service:{proxy['ID']}"
    assert proxy["Tags"] == ["v1"]


@pytest.mark.parametrize(("consul", "message"), [
    ({"services": [{"name": "inventory", "mode": "plain"}]},
     "consul.services[0].mode: outbound mesh services must be connect"),
    ({"registration": {"enabled": True, "service_name": "x"}},
     "consul.registration.service_name: set by the sidecar"),
])
def test_sidecar_consul_settings_errors_name_the_key(consul, message):
    with pytest.raises(ConfigError) as raised:
        parse({"trust_domain": "mesh.local", "service": {"name": "orders", "port": 8080},
               "identity": {"spiffe_id": ORDERS_ID}, "consul": consul})
    assert any(line.startswith(message) for line in raised.value.errors), raised.value.errors
