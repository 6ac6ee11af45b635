"""The demo mesh behind the gateway: orders and inventory, each a plain-HTTP app on loopback behind its own sidecar,
all in the demo's process. orders calls inventory through its sidecar; the sidecars' Rego policy
(demo/policies/mesh_inbound.rego) lets only the gateway call orders and only orders call inventory. The sidecars
get their SVIDs as in production: from the CA's issuance API (`ca serve`, here in-process) with a one-time join
token, renewed over mTLS.

Ports, from `base` (default 9100): apps base+1 (orders) and base+2 (inventory); sidecar inbound base+11 / base+12;
orders' outbound base+21; sidecar admin base+31 / base+32.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh_gateway import sidecar_config as sidecar_config_module
from mesh_gateway.demo.apps import RunningApp, inventory_app, orders_app, start_app
from mesh_gateway.identity.issuer_api import IssuerServer, IssuerSettings
from mesh_gateway.identity.join_tokens import JoinTokenStore
from mesh_gateway.identity.local_issuer import LocalIssuer
from mesh_gateway.model import SpiffeId
from mesh_gateway.process import StartupError
from mesh_gateway.sidecar import Sidecar, first_svid

TRUST_DOMAIN = "mesh.local"
GATEWAY_ID = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/gateway"
ORDERS_ID = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/orders"
INVENTORY_ID = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/inventory"
HOST = "127.0.0.1"
TOKEN_TTL_S = 300.0
POLICIES = Path(__file__).resolve().parent / "policies"


def tracing_settings(otlp: str | None) -> dict[str, Any]:
    """Every process of the demo exports to the same collector when one is given, so a request is one trace."""
    return {"exporter": "otlp_grpc", "endpoint": otlp, "sampling_ratio": 1.0} if otlp else {"exporter": "none"}


@dataclass(frozen=True)
class MeshPorts:
    """Fixed ports from `base` (so the printed URLs stay the same run after run); base 0 → every port ephemeral."""

    base: int = 9100

    def _at(self, offset: int) -> int:
        return self.base + offset if self.base else 0

    @property
    def orders_app(self) -> int:
        return self._at(1)

    @property
    def inventory_app(self) -> int:
        return self._at(2)

    @property
    def orders_inbound(self) -> int:
        return self._at(11)

    @property
    def inventory_inbound(self) -> int:
        return self._at(12)

    @property
    def orders_outbound(self) -> int:
        return self._at(21)

    @property
    def orders_admin(self) -> int:
        return self._at(31)

    @property
    def inventory_admin(self) -> int:
        return self._at(32)

    @property
    def issuer(self) -> int:
        return self._at(41)

    @property
    def issuer_bootstrap(self) -> int:
        return self._at(42)


def sidecar_config(ca_dir: Path, name: str, spiffe_id: str, *, app: int, inbound: int, admin: int,
                   outbound: dict[str, Any], catalog: dict[str, Any], otlp: str | None, issuer: IssuerServer
                   ) -> sidecar_config_module.SidecarConfig:
    remote = {"address": f"{HOST}:{issuer.port}", "bootstrap_address": f"{HOST}:{issuer.bootstrap_port}",
              "server_name": "localhost", "bundle": str(ca_dir / "bundle.pem")}
    return sidecar_config_module.parse({
        "trust_domain": TRUST_DOMAIN,
        "service": {"name": name, "address": HOST, "port": app},
        "identity": {"spiffe_id": spiffe_id, "issuer": "remote", "remote": remote, "dns": [], "ttl": "1h"},
        "inbound": {"address": f"{HOST}:{inbound}"},
        "outbound": outbound,
        "catalog": {"static": catalog},
        "admin": {"address": f"{HOST}:{admin}"},
        "drain_timeout_s": 2,
        "authz": {"policies": str(POLICIES)},
        # One access log is enough for the demo's terminal: the gateway's.
        "telemetry": {"tracing": tracing_settings(otlp), "access_log": {"enabled": False}},
    })


def gateway_catalog(mesh: DemoMesh) -> dict[str, list[dict[str, Any]]]:
    """The gateway reaches each service at its sidecar, and expects the service's identity there."""
    return {
        "orders": [{"address": HOST, "port": mesh.orders_inbound, "spiffe_id": ORDERS_ID}],
        "inventory": [{"address": HOST, "port": mesh.inventory_inbound, "spiffe_id": INVENTORY_ID}],
    }


def gateway_routes() -> list[dict[str, Any]]:
    return [
        {"name": "orders", "match": {"path_prefix": "/orders/"}, "service": "orders"},
        # Routed on purpose: inventory's sidecar refuses the gateway's identity — the demo's denied request.
        {"name": "inventory", "match": {"path_prefix": "/items"}, "service": "inventory"},
    ]


def _listen(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((HOST, port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"demo mesh: cannot listen on {HOST}:{port}: {exc.strerror} (try --mesh-ports)") from None
    sock.listen(256)
    sock.setblocking(False)
    return sock


@dataclass
class DemoMesh:
    issuer: IssuerServer
    tokens: JoinTokenStore
    apps: list[RunningApp] = field(default_factory=list)
    sidecars: dict[str, Sidecar] = field(default_factory=dict)

    @property
    def orders_inbound(self) -> int:
        return self.sidecars["orders"].addresses["inbound"][1]

    @property
    def inventory_inbound(self) -> int:
        return self.sidecars["inventory"].addresses["inbound"][1]

    def admin_url(self, service: str) -> str:
        host, port = self.sidecars[service].addresses["admin"]
        return f"http://{host}:{port}"

    async def _add_sidecar(self, config: sidecar_config_module.SidecarConfig) -> Sidecar:
        spiffe_id = SpiffeId.parse(config.identity.spiffe_id)
        token = await asyncio.to_thread(self.tokens.create, spiffe_id, TOKEN_TTL_S)
        sidecar = Sidecar(config, await first_svid(config, join_token=token))
        await sidecar.start()
        self.sidecars[config.service.name] = sidecar
        return sidecar

    async def close(self) -> None:
        for sidecar in self.sidecars.values():
            await sidecar.stop()
        for app in self.apps:
            await app.close()
        await self.issuer.stop()


async def start_mesh(ca_dir: Path, ports: MeshPorts, otlp: str | None = None) -> DemoMesh:
    """Each app's socket is bound first (its sidecar needs the port), then the sidecars, then orders' app (it needs
    its sidecar's outbound port). On any failure what was started is stopped again."""
    issuer = IssuerServer(LocalIssuer(ca_dir), IssuerSettings(
        address=f"{HOST}:{ports.issuer}", bootstrap_address=f"{HOST}:{ports.issuer_bootstrap}"))
    try:
        await issuer.start()
    except OSError as exc:
        await issuer.stop()
        raise StartupError(f"demo mesh: CA API: {exc} (try --mesh-ports)") from None
    mesh = DemoMesh(issuer, JoinTokenStore(ca_dir))
    try:
        inventory_sock = _listen(ports.inventory_app)
    except StartupError:
        await issuer.stop()
        raise
    try:
        orders_sock = _listen(ports.orders_app)
    except StartupError:
        inventory_sock.close()
        await issuer.stop()
        raise
    try:
        mesh.apps.append(await start_app(inventory_app(), inventory_sock))
        inventory = await mesh._add_sidecar(sidecar_config(
            ca_dir, "inventory", INVENTORY_ID, app=inventory_sock.getsockname()[1], inbound=ports.inventory_inbound,
            admin=ports.inventory_admin, outbound={"enabled": False}, catalog={}, otlp=otlp, issuer=issuer))
        orders = await mesh._add_sidecar(sidecar_config(
            ca_dir, "orders", ORDERS_ID, app=orders_sock.getsockname()[1], inbound=ports.orders_inbound,
            admin=ports.orders_admin, outbound={"address": f"{HOST}:{ports.orders_outbound}"},
            catalog={"inventory": [{"address": HOST, "port": inventory.addresses["inbound"][1],
                                    "spiffe_id": INVENTORY_ID}]}, otlp=otlp, issuer=issuer))
        outbound_port = orders.addresses["outbound"][1]
        mesh.apps.append(await start_app(orders_app(f"http://{HOST}:{outbound_port}/inventory"), orders_sock))
    except BaseException:
        await mesh.close()
        for sock in (inventory_sock, orders_sock):
            sock.close()
        raise
    return mesh
