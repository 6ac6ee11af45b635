"""Values of the fake Consul agent: ACL policies, checks, service instances, recorded requests."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
MAX_WAIT_S = 600.0
DEFAULT_WAIT_S = 300.0


def parse_go_duration(text: str) -> float:
    """Consul parses `wait` with Go's time.ParseDuration: "10s", "5m", "1m30s", "250ms"."""
    if not text or _GO_DURATION.sub("", text) != "":
        raise ValueError(f"invalid duration {text!r}")
    return sum(float(n) * _UNIT[u] for n, u in _GO_DURATION.findall(text))


@dataclass
class Policy:
    """What one ACL token may do. `"*"` grants every service."""

    service_read: set[str] | str = field(default_factory=set)
    service_write: set[str] | str = field(default_factory=set)

    def can_read(self, service: str) -> bool:
        return self.service_read == "*" or service in self.service_read or self.can_write(service)

    def can_write(self, service: str) -> bool:
        return self.service_write == "*" or service in self.service_write


@dataclass
class Check:
    check_id: str
    name: str
    service_id: str
    status: str = "critical"
    output: str = ""
    kind: str = ""
    ttl_s: float | None = None
    http: str | None = None
    interval_s: float = 10.0
    alias_service: str | None = None
    modify_index: int = 0
    timer: asyncio.TimerHandle | None = None
    task: asyncio.Task[None] | None = None


@dataclass
class Instance:
    service_id: str
    name: str
    address: str
    port: int
    tags: list[str] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)
    kind: str = ""
    proxy: dict[str, Any] = field(default_factory=dict)
    native: bool = False
    create_index: int = 0
    modify_index: int = 0


@dataclass(frozen=True)
class Seen:
    """One request as the fake received it, for tests that assert what the client sent."""

    method: str
    path: str
    query: dict[str, str]
    token: str | None


def get_ci(body: dict[str, Any], key: str, default: Any = None) -> Any:
    """Consul decodes request JSON case-insensitively."""
    for k, v in body.items():
        if k.lower() == key.lower():
            return v
    return default


def bearer(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    return auth[7:] if auth.startswith("Bearer ") else None


def denied(permission: str, resource: str) -> web.Response:
    return web.Response(status=403, text=f"Permission denied: token lacks permission '{permission}' on "
                                         f'"{resource}"')


def health_entry(agent: Any, inst: Instance, checks: list[tuple[Check, str]]) -> dict[str, Any]:
    """One element of a /v1/health/service answer: Node, Service and Checks (the node's serfHealth first)."""
    return {
        "Node": {"ID": agent.node_id, "Node": agent.node, "Address": agent.node_address,
                 "Datacenter": agent.datacenter, "TaggedAddresses": {"lan": agent.node_address},
                 "Meta": {"consul-network-segment": ""}},
        "Service": {"ID": inst.service_id, "Service": inst.name, "Tags": inst.tags, "Address": inst.address,
                    "Meta": inst.meta, "Port": inst.port, "Weights": {"Passing": 1, "Warning": 1},
                    "EnableTagOverride": False, "Kind": inst.kind, "Proxy": inst.proxy,
                    "Connect": {"Native": True} if inst.native else {},
                    "CreateIndex": inst.create_index, "ModifyIndex": inst.modify_index},
        "Checks": [{"Node": agent.node, "CheckID": "serfHealth", "Name": "Serf Health Status",
                    "Status": "passing", "Output": "Agent alive and reachable", "ServiceID": "",
                    "ServiceName": "", "Type": ""}]
        + [{"Node": agent.node, "CheckID": c.check_id, "Name": c.name, "Status": status, "Output": c.output,
            "ServiceID": inst.service_id, "ServiceName": inst.name, "ServiceTags": inst.tags, "Type": c.kind,
            "ModifyIndex": c.modify_index} for c, status in checks],
    }
