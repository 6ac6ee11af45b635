"""Admin views owned by telemetry: /metrics, /config (effective, secrets redacted) and /routes."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from mesh_gateway.config import GatewayConfig
from mesh_gateway.edges.admin import Admin
from mesh_gateway.model import Route
from mesh_gateway.routing import CompiledRoutes
from mesh_gateway.telemetry.metrics import CONTENT_TYPE, Metrics
from mesh_gateway.watch import Watch

REDACTED = "<redacted>"
# Secrets are SecretStr in config (dumped masked); names are checked too so a plain-str secret added later by
# another feature is still not served.
_SECRET_NAME = re.compile(r"(secret|password|passwd|token|api[_-]?key|authorization|credential|private)", re.I)


def redact(value: Any, key: str = "") -> Any:
    if key and _SECRET_NAME.search(key) and value not in (None, "", {}, []):
        return REDACTED
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if value == "**********":  # pydantic's mask for SecretStr
        return REDACTED
    return value


def effective_config(config: GatewayConfig) -> Any:
    return redact(config.model_dump(mode="json"))


def route_view(route: Route) -> dict[str, Any]:
    m = route.match
    match: dict[str, Any] = {"host": m.host, "path_kind": m.path_kind, "path": m.path,
                             "methods": sorted(m.methods), "headers": dict(m.headers)}
    if m.grpc_service is not None:
        match.update(grpc_service=m.grpc_service, grpc_method=m.grpc_method)
    p = route.policy
    return {
        "name": route.name,
        "service": route.service,
        "source": route.source,
        "match": match,
        "policy": {"timeout_s": p.timeout_s, "connect_timeout_s": p.connect_timeout_s,
                   "idle_timeout_s": p.idle_timeout_s, "max_body_bytes": p.max_body_bytes, "retries": p.retries,
                   "authz_enabled": p.authz_enabled, "authz_failure_mode_allow": p.authz_failure_mode_allow,
                   "authz_dry_run": p.authz_dry_run},
    }


def add_telemetry_views(admin: Admin, *, config: GatewayConfig, routes: Watch[CompiledRoutes],
                        metrics: Metrics | None) -> None:
    admin.add_json_view("/config", lambda: effective_config(config))
    admin.add_json_view("/routes", lambda: {"routes": [route_view(r) for r in routes.get().table.routes]})
    if metrics is not None:
        async def scrape(_: web.Request) -> web.Response:
            return web.Response(body=metrics.exposition(), headers={"content-type": CONTENT_TYPE})

        admin.add_handler("/metrics", scrape)
