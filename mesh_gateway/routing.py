"""match(table, info) -> Route: first match in file order wins. Pure and precompiled."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from mesh_gateway.errors import NotFound
from mesh_gateway.model import RequestInfo, Route, RouteMatch, RouteTable

Predicate = Callable[[RequestInfo], bool]


def normalise_host(host: str) -> str:
    """Lower-case, without port or trailing dot; IPv6 literals keep their brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end != -1 else host
    host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return host.rstrip(".")


def _host_predicate(pattern: str) -> Predicate | None:
    pattern = pattern.lower()
    if pattern in ("", "*"):
        return None
    if pattern.startswith("*."):
        suffix = pattern[1:]
        return lambda info: (h := normalise_host(info.host)).endswith(suffix) and len(h) > len(suffix)
    return lambda info: normalise_host(info.host) == pattern


def _path_predicate(match: RouteMatch) -> Predicate | None:
    if match.grpc_service is not None:
        if match.grpc_method is not None:
            exact = f"/{match.grpc_service}/{match.grpc_method}"
            return lambda info: info.path == exact
        prefix = f"/{match.grpc_service}/"
        return lambda info: info.path.startswith(prefix)
    if match.path_kind == "exact":
        path = match.path
        return lambda info: info.path == path
    if match.path_kind == "regex":
        regex = re.compile(match.path)
        return lambda info: regex.fullmatch(info.path) is not None
    if match.path == "/":
        return None
    prefix = match.path
    return lambda info: info.path.startswith(prefix)


def _header_equals(name: str, value: str) -> Predicate:
    return lambda info: info.header(name) == value


def compile_match(match: RouteMatch) -> Predicate:
    checks: list[Predicate] = []
    for predicate in (_host_predicate(match.host), _path_predicate(match)):
        if predicate is not None:
            checks.append(predicate)
    if match.methods:
        methods = match.methods
        checks.append(lambda info: info.method in methods)
    for name, value in match.headers:
        checks.append(_header_equals(name.lower(), value))
    if not checks:
        return lambda info: True
    if len(checks) == 1:
        return checks[0]
    return lambda info: all(check(info) for check in checks)


@dataclass(frozen=True, slots=True)
class CompiledRoutes:
    table: RouteTable
    entries: tuple[tuple[Predicate, Route], ...]

    def match(self, info: RequestInfo) -> Route:
        for predicate, route in self.entries:
            if predicate(info):
                return route
        raise NotFound(f"no route for {info.method} {info.host}{info.path}")


def compile_routes(table: RouteTable) -> CompiledRoutes:
    return CompiledRoutes(table, tuple((compile_match(r.match), r) for r in table.routes))


def match(table: RouteTable, info: RequestInfo) -> Route:
    return compile_routes(table).match(info)
