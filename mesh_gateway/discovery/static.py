"""The static catalog and file routes, from config to model values."""

from __future__ import annotations

from mesh_gateway import config as cfg
from mesh_gateway.model import Catalog, Endpoint, EndpointSet, Route, RouteMatch, RoutePolicy, RouteTable, SpiffeId


def catalog_from_config(catalog: cfg.Catalog) -> Catalog:
    services = {
        name: EndpointSet(
            service=name,
            endpoints=tuple(
                Endpoint(address=e.address, port=e.port, tls=e.tls,
                         spiffe_id=SpiffeId.parse(e.spiffe_id) if e.spiffe_id else None)
                for e in endpoints
            ),
        )
        for name, endpoints in catalog.static.items()
    }
    return Catalog(services)


def route_from_config(route: cfg.Route, limits: cfg.Limits) -> Route:
    m = route.match
    if m.path is not None:
        kind, path = "exact", m.path
    elif m.path_regex is not None:
        kind, path = "regex", m.path_regex
    else:
        kind, path = "prefix", m.path_prefix or "/"
    match = RouteMatch(host=m.host, path_kind=kind, path=path, methods=frozenset(m.methods),  # type: ignore[arg-type]
                       headers=tuple(sorted(m.headers.items())),
                       grpc_service=m.grpc.service if m.grpc else None,
                       grpc_method=m.grpc.method if m.grpc else None)
    policy = RoutePolicy(
        timeout_s=route.timeout_s,
        connect_timeout_s=route.connect_timeout_s,
        idle_timeout_s=route.idle_timeout_s,
        max_body_bytes=route.max_body_bytes if route.max_body_bytes is not None else limits.max_body_bytes,
        retries=route.retries,
        per_try_timeout_s=route.per_try_timeout_s,
        upstream_security=route.upstream_security,
        load_balancing=route.load_balancing,
        authz_enabled=not route.authz.disabled,
        authz_failure_mode_allow=route.authz.failure_mode_allow,
        authz_dry_run=route.authz.dry_run,
        authz_query=route.authz.query,
        authz_include_body_bytes=route.authz.include_body_bytes,
    )
    return Route(name=route.name, match=match, service=route.service, policy=policy)


def routes_from_config(config: cfg.GatewayConfig) -> RouteTable:
    return RouteTable(tuple(route_from_config(r, config.limits) for r in config.routes))
