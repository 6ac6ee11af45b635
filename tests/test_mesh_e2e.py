"""The full mesh, as real processes: inventory and two orders instances (`mesh-gateway demo-app`), each behind its own
`mesh-gateway sidecar` process, all registered in Consul (a fake agent speaking Consul's HTTP API) and found there by
the gateway and by orders' sidecar — on 127.0.0.1 port 0, with TLS from one CA, traces to one OTLP receiver."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.consul_support import until
from tests.fakes.consul import FakeConsul
from tests.fakes.otlp import OtlpReceiver
from tests.processes import ROOT, Process, spawn
from tests.support import CLIENT_ID, GATEWAY_ID, client_ssl, gateway_config, issue, running, url

POLICIES = ROOT / "mesh_gateway" / "demo" / "policies"
ORDERS_ID = "spiffe://mesh.local/ns/default/sa/orders"
INVENTORY_ID = "spiffe://mesh.local/ns/default/sa/inventory"
TTL = "3s"


def write_sidecar_config(directory: Path, name: str, data: dict[str, Any]) -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def tracing(otlp: str) -> dict[str, Any]:
    return {"exporter": "otlp_grpc", "endpoint": otlp, "export_delay_s": 0.1}


def consul_block(consul: str, services: list[str], **extra: Any) -> dict[str, Any]:
    return {"address": consul.split("://")[1], "wait_s": 60, "retry_base_s": 0.01, "retry_max_s": 0.05,
            "rate_limit_per_s": 100, "watch_tagged": False, "services": [{"name": s} for s in services], **extra}


def sidecar_data(ca_dir: Path, service: str, spiffe_id: str, app_port: int, otlp: str, consul: str,
                 calls: list[str]) -> dict[str, Any]:
    """The demo's inbound policy (mesh_inbound.rego) decides who may call: gateway → orders → inventory. The
    sidecar registers its service and itself (connect-proxy, TTL check) and finds `calls` in Consul."""
    return {
        "trust_domain": "mesh.local",
        "service": {"name": service, "port": app_port},
        "identity": {"spiffe_id": spiffe_id, "issuer": "local", "ca_dir": str(ca_dir)},
        "inbound": {"address": "127.0.0.1:0"},
        "outbound": {"address": "127.0.0.1:0", "enabled": bool(calls)},
        "consul": consul_block(consul, calls, registration={"enabled": True, "check": "ttl", "ttl_s": TTL}),
        "admin": {"address": "127.0.0.1:0"},
        "drain_timeout_s": 2,
        "authz": {"policies": str(POLICIES)},
        "telemetry": {"tracing": tracing(otlp), "access_log": {"enabled": False}},
    }


SERVING = r"serving: inbound=127\.0\.0\.1:(\d+)(?:, outbound=127\.0\.0\.1:(\d+))?"


@contextlib.asynccontextmanager
async def mesh(ca_dir: Path, workdir: Path, otlp: str, consul: str) -> AsyncIterator[dict[str, Process]]:
    procs: list[Process] = []
    try:
        inventory = await spawn("inventory", "demo-app", "inventory", "--listen", "127.0.0.1:0")
        procs.append(inventory)
        inventory_port = int((await inventory.wait_for(r"listening on 127\.0\.0\.1:(\d+)")).group(1))
        inv_sidecar = await spawn("inventory-sidecar", "sidecar", "-c", str(write_sidecar_config(
            workdir, "inventory", sidecar_data(ca_dir, "inventory", INVENTORY_ID, inventory_port, otlp, consul, []))))
        procs.append(inv_sidecar)
        await inv_sidecar.wait_for(SERVING)
        for index in range(2):
            # The app's socket is bound first so its sidecar knows the port; the app then needs the sidecar's
            # outbound port. The bound socket is handed to the app process, so no port is ever guessed.
            app_sock = socket.socket()
            app_sock.bind(("127.0.0.1", 0))
            app_sock.listen(64)
            sidecar = await spawn(f"orders-sidecar-{index}", "sidecar", "-c", str(write_sidecar_config(
                workdir, f"orders-{index}", sidecar_data(ca_dir, "orders", ORDERS_ID, app_sock.getsockname()[1],
                                                         otlp, consul, ["inventory"]))))
            procs.append(sidecar)
            found = await sidecar.wait_for(SERVING)
            app = await spawn(f"orders-{index}", "demo-app", "orders", "--listen-fd", str(app_sock.fileno()),
                              "--inventory-url", f"http://127.0.0.1:{found.group(2)}/inventory",
                              pass_fds=(app_sock.fileno(),))
            app_sock.close()
            procs.append(app)
            await app.wait_for("listening on")
        yield {p.name: p for p in procs}
    finally:
        for proc in reversed(procs):
            await proc.stop()


@pytest.fixture
def otlp() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture
async def consul() -> AsyncIterator[FakeConsul]:
    fake = FakeConsul()
    await fake.start()
    yield fake
    await fake.close()


def gateway_for(ca_dir: Path, otlp: OtlpReceiver, consul: FakeConsul) -> Any:
    routes = [{"name": "orders", "match": {"path_prefix": "/orders/"}, "service": "orders"},
              {"name": "inventory", "match": {"path_prefix": "/items"}, "service": "inventory"}]
    return gateway_config(ca_dir, {}, routes=routes, discovery={"consul": consul_block(consul.url, ["orders",
                                                                                                   "inventory"])},
                          telemetry={"tracing": tracing(otlp.endpoint), "access_log": {"enabled": False}})


def instances(catalog: Any, service: str) -> list[int]:
    found = catalog.get(service)
    return sorted(e.port for e in found.endpoints) if found else []


async def test_full_mesh_through_consul_in_one_trace(ca, ca_dir, tmp_path, otlp, consul):
    async with mesh(ca_dir, tmp_path, otlp.endpoint, consul.url) as procs, \
            running(gateway_for(ca_dir, otlp, consul)) as gw, aiohttp.ClientSession() as client:
        # Found through Consul: both orders sidecars and inventory's, as connect-proxies of their services.
        catalog = await until(gw.catalog, lambda c: len(instances(c, "orders")) == 2 and instances(c, "inventory"),
                              timeout_s=15)
        assert {str(e.spiffe_id) for e in catalog.get("orders").endpoints} == {ORDERS_ID}
        proxies = [i for i in consul.instances.values() if i.kind == "connect-proxy"]
        assert sorted(i.proxy["DestinationServiceName"] for i in proxies) == ["inventory", "orders", "orders"]
        client_tls = client_ssl(ca.bundle_pem, issue(ca, CLIENT_ID))
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        # Allowed: gateway → orders' sidecar → orders → its sidecar → inventory's sidecar → inventory.
        async with client.get(url(gw, "/orders/apple"), ssl=client_tls,
                              headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}) as resp:
            assert resp.status == 200, await resp.text()
            body = await resp.json()
        assert body["caller"] == GATEWAY_ID
        assert body["inventory"]["caller"] == ORDERS_ID
        assert body["inventory"]["in_stock"] == 12
        assert body["inventory"]["traceparent"].split("-")[1] == trace_id
        # Denied by inventory's sidecar policy: the gateway's identity may not call inventory.
        async with client.get(url(gw, "/items"), ssl=client_tls) as resp:
            assert resp.status == 403
            assert (await resp.json())["error"] == "forbidden"
        # A mesh identity other than the gateway calling an orders sidecar directly is refused as well.
        direct = client_ssl(ca.bundle_pem, issue(ca, CLIENT_ID))
        direct.check_hostname = False
        async with client.get(f"https://127.0.0.1:{instances(catalog, 'orders')[0]}/orders/apple",
                              ssl=direct) as resp:
            assert resp.status == 403

        # Every hop has exported its spans of that request before anything is killed.
        await otlp.wait_for(lambda spans: {s.resource["service.name"] for s in spans if s.trace_id == trace_id}
                            >= {"mesh-gateway", "orders-sidecar", "inventory-sidecar"}, timeout_s=15)

        # One orders sidecar dies without a word: the gateway routes around it at once (retry on connect
        # failure, then ejection), and Consul's TTL check takes it out of the catalog.
        await procs["orders-sidecar-1"].stop(signal.SIGKILL)
        for _ in range(6):
            async with client.get(url(gw, "/orders/plum"), ssl=client_tls) as resp:
                assert resp.status == 200, await resp.text()
        await until(gw.catalog, lambda c: len(instances(c, "orders")) == 1, timeout_s=15)

        # Every other process shuts down cleanly on SIGTERM, the sidecars taking themselves out of Consul first.
        codes = {name: await proc.stop() for name, proc in procs.items() if name != "orders-sidecar-1"}
        assert set(codes.values()) == {0}, codes
        left = sorted(i.service_id for i in consul.instances.values())
        assert len(left) == 2 and all("orders" in s for s in left), "only the killed sidecar's entries remain"
        decisions = [json.loads(line) for line in procs["inventory-sidecar"].lines if line.startswith("{")]
        assert {(d["principal"], d["result"]) for d in decisions} >= {(GATEWAY_ID, "deny"), (ORDERS_ID, "allow")}

    spans = [s for s in otlp.snapshot() if s.trace_id == trace_id]
    by_service: dict[str, list[Any]] = {}
    for span in spans:
        by_service.setdefault(span.resource["service.name"], []).append(span)
    assert set(by_service) == {"mesh-gateway", "orders-sidecar", "inventory-sidecar"}

    def one(service: str, name: str, kind: str) -> Any:
        found = [s for s in by_service[service] if s.name == name and s.kind == kind]
        assert len(found) == 1, (service, name, kind, [(s.name, s.kind) for s in by_service[service]])
        return found[0]

    # One connected chain of parents across the three processes (and through the orders app).
    gateway_in = one("mesh-gateway", "GET orders", "server")
    gateway_out = one("mesh-gateway", "upstream", "client")
    orders_in = one("orders-sidecar", "GET inbound", "server")
    orders_to_app = next(s for s in by_service["orders-sidecar"]
                         if s.name == "upstream" and s.parent_span_id == orders_in.span_id)
    orders_out = one("orders-sidecar", "GET outbound.inventory", "server")
    orders_to_inventory = next(s for s in by_service["orders-sidecar"]
                               if s.name == "upstream" and s.parent_span_id == orders_out.span_id)
    inventory_in = one("inventory-sidecar", "GET inbound", "server")
    assert gateway_in.parent_span_id == "00f067aa0ba902b7"
    assert orders_in.parent_span_id == gateway_out.span_id
    assert orders_out.parent_span_id == orders_to_app.span_id
    assert inventory_in.parent_span_id == orders_to_inventory.span_id
    assert inventory_in.attributes["mesh.peer.spiffe_id"] == ORDERS_ID
