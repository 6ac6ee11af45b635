"""The demo mesh behind the gateway: orders and inventory, each a plain-HTTP app on loopback behind its own sidecar,
all in the demo's process. orders calls inventory through its sidecar; only the gateway may call orders and only
orders may call inventory.

Ports, from `base` (default 9100): apps base+1 (orders) and base+2 (inventory); sidecar inbound base+11 / base+12;
orders' outbound base+21; sidecar admin base+31 / base+32.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh_gateway import sidecar_config
from mesh_gateway.app import StartupError
from mesh_gateway.demo.apps import RunningApp, inventory_app, orders_app, start_app
from mesh_gateway.sidecar import Sidecar

TRUST_DOMAIN = "mesh.local"
GATEWAY_ID = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/gateway"
ORDERS_ID = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/orders"
INVENTORY_ID = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/inventory"
HOST = "127.0.0.1"


@dataclass(frozen=True)
class MeshPorts:
    base: int = 9100

    @property
    def orders_app(self) -> int:
        return self.base + 1

    @property
    def inventory_app(self) -> int:
        return self.base + 2

    @property
    def orders_inbound(self) -> int:
        return self.base + 11

    @property
    def inventory_inbound(self) -> int:
        return self.base + 12

    @property
    def orders_outbound(self) -> int:
        return self.base + 21

    @property
    def orders_admin(self) -> int:
        return self.base + 31

    @property
    def inventory_admin(self) -> int:
        return self.base + 32


def sidecar_configs(ca_dir: Path, ports: MeshPorts) -> tuple[sidecar_config.SidecarConfig,
                                                             sidecar_config.SidecarConfig]:
    def config(name: str, spiffe_id: str, app: int, inbound: int, admin: int, callers: list[str],
               outbound: dict[str, Any], catalog: dict[str, Any]) -> sidecar_config.SidecarConfig:
        return sidecar_config.parse({
            "trust_domain": TRUST_DOMAIN,
            "service": {"name": name, "address": HOST, "port": app},
            "identity": {"spiffe_id": spiffe_id, "issuer": "local", "ca_dir": str(ca_dir), "ttl": "24h"},
            "inbound": {"address": f"{HOST}:{inbound}", "allowed_peers": callers},
            "outbound": outbound,
            "catalog": {"static": catalog},
            "admin": {"address": f"{HOST}:{admin}"},
            "drain_timeout_s": 2,
        })

    orders = config("orders", ORDERS_ID, ports.orders_app, ports.orders_inbound, ports.orders_admin, [GATEWAY_ID],
                    {"address": f"{HOST}:{ports.orders_outbound}"},
                    {"inventory": [{"address": HOST, "port": ports.inventory_inbound, "spiffe_id": INVENTORY_ID}]})
    inventory = config("inventory", INVENTORY_ID, ports.inventory_app, ports.inventory_inbound,
                       ports.inventory_admin, [ORDERS_ID], {"enabled": False}, {})
    return orders, inventory


def gateway_catalog(ports: MeshPorts) -> dict[str, list[dict[str, Any]]]:
    """The gateway reaches each service at its sidecar, and expects the service's identity there."""
    return {
        "orders": [{"address": HOST, "port": ports.orders_inbound, "spiffe_id": ORDERS_ID}],
        "inventory": [{"address": HOST, "port": ports.inventory_inbound, "spiffe_id": INVENTORY_ID}],
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
    apps: list[RunningApp] = field(default_factory=list)
    sidecars: list[Sidecar] = field(default_factory=list)

    async def close(self) -> None:
        for sidecar in self.sidecars:
            await sidecar.stop()
        for app in self.apps:
            await app.close()


async def start_mesh(ca_dir: Path, ports: MeshPorts) -> DemoMesh:
    """Apps first, then their sidecars; on any failure what was started is stopped again."""
    mesh = DemoMesh()
    orders_config, inventory_config = sidecar_configs(ca_dir, ports)
    try:
        mesh.apps.append(await start_app(inventory_app(), _listen(ports.inventory_app)))
        mesh.apps.append(await start_app(orders_app(f"http://{HOST}:{ports.orders_outbound}/inventory"),
                                         _listen(ports.orders_app)))
        for config in (inventory_config, orders_config):
            sidecar = Sidecar(config)
            await sidecar.start()
            mesh.sidecars.append(sidecar)
    except BaseException:
        await mesh.close()
        raise
    return mesh
