"""Static settings from gateway.yaml: pydantic v2 models, frozen, unknown keys rejected.

`load(path)` returns a `GatewayConfig` or raises `ConfigError` whose lines each name a key path,
e.g. ``routes[1].match.path_prefix: must start with '/'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from mesh_gateway.config.authz import (
    Authz,
    DecisionLogConfig,
    OpaServer,
    resolve_authz_paths,
)
from mesh_gateway.config.base import (
    Duration,
    HostPort,
    KeyPathError,
    Model,
    RegoQuery,
    SpiffeIdText,
    normalise_query,
    parse_duration,
    split_host_port,
    under,
)
from mesh_gateway.config.discovery import (
    Consul,
    ConsulName,
    ConsulRegister,
    ConsulService,
    ConsulTls,
    Discovery,
    Outlier,
    Resilience,
    ServiceResilience,
    resolve_discovery_paths,
)
from mesh_gateway.config.identity import (
    ConsulCA,
    Identity,
    RemoteIssuer,
    resolve_identity_paths,
)
from mesh_gateway.config.listeners import (
    Admin,
    GrpcSettings,
    Http2Settings,
    Limits,
    Listener,
    ListenerTls,
    Protocols,
    Upstream,
    WebSocketSettings,
)
from mesh_gateway.config.routes import (
    Catalog,
    GrpcMatch,
    Route,
    RouteAuthz,
    RouteAuthzCache,
    RouteMatch,
    StaticEndpoint,
)
from mesh_gateway.config.telemetry import (
    AccessLog,
    Metrics,
    Propagator,
    Telemetry,
    Tracing,
    resolve_telemetry_paths,
)
from mesh_gateway.model import SpiffeId

__all__ = [
    "AccessLog",
    "Admin",
    "Authz",
    "Catalog",
    "ConfigError",
    "Consul",
    "ConsulCA",
    "ConsulName",
    "ConsulRegister",
    "ConsulService",
    "ConsulTls",
    "DecisionLogConfig",
    "Discovery",
    "Duration",
    "GatewayConfig",
    "GrpcMatch",
    "GrpcSettings",
    "HostPort",
    "Http2Settings",
    "Identity",
    "KeyPathError",
    "Limits",
    "Listener",
    "ListenerTls",
    "Metrics",
    "Model",
    "OpaServer",
    "Outlier",
    "Propagator",
    "Protocols",
    "RegoQuery",
    "RemoteIssuer",
    "Resilience",
    "Route",
    "RouteAuthz",
    "RouteAuthzCache",
    "RouteMatch",
    "ServiceResilience",
    "SpiffeIdText",
    "StaticEndpoint",
    "Telemetry",
    "Tracing",
    "Upstream",
    "WebSocketSettings",
    "format_loc",
    "load",
    "normalise_query",
    "parse",
    "parse_duration",
    "resolve_authz_paths",
    "resolve_discovery_paths",
    "resolve_identity_paths",
    "resolve_paths",
    "resolve_telemetry_paths",
    "split_host_port",
    "under",
]


class GatewayConfig(Model):
    trust_domain: str = Field(pattern=r"^[a-z0-9._-]+$")
    listeners: tuple[Listener, ...] = Field(min_length=1)
    identity: Identity
    catalog: Catalog = Catalog()
    routes: tuple[Route, ...] = ()
    admin: Admin = Admin()
    limits: Limits = Limits()
    upstream: Upstream = Upstream()
    protocols: Protocols = Protocols()
    drain_timeout_s: float = Field(default=15.0, ge=0)
    workers: int | Literal["auto"] = Field(default=1)
    """Gateway processes sharing the listeners via SO_REUSEPORT; "auto" = one per usable CPU (see workers.py)."""

    @field_validator("workers")
    @classmethod
    def _worker_count(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 64:
            raise ValueError("must be between 1 and 64, or 'auto'")
        return value

    discovery: Discovery = Discovery()
    resilience: Resilience = Resilience()
    telemetry: Telemetry = Telemetry()
    authz: Authz | None = None
    """Absent → no authorization at all (logged loudly at start-up)."""

    @model_validator(mode="after")
    def _cross_checks(self) -> GatewayConfig:
        if self.workers != 1:
            # Each worker binds its own socket: port 0 would give every worker a different ephemeral port.
            for index, listener in enumerate(self.listeners):
                if split_host_port(listener.address)[1] == 0:
                    raise KeyPathError(("listeners", index, "address"), "needs a fixed port when workers is not 1")
        if SpiffeId.parse(self.identity.spiffe_id).trust_domain != self.trust_domain:
            raise KeyPathError(("identity", "spiffe_id"), f"must be in trust domain {self.trust_domain!r}")
        names = [listener.name for listener in self.listeners]
        for index, name in enumerate(names):
            if names.index(name) != index:
                raise KeyPathError(("listeners", index, "name"), f"duplicate listener name {name!r}")
        for index, listener in enumerate(self.listeners):
            # grpcio's server credentials either require a client certificate or never ask for one.
            if listener.protocol == "grpc" and listener.tls is not None and listener.tls.client_auth == "optional":
                raise KeyPathError(("listeners", index, "tls", "client_auth"),
                                "a grpc listener supports 'required' or 'none', not 'optional'")
        route_names = [route.name for route in self.routes]
        for index, route in enumerate(self.routes):
            if route_names.index(route.name) != index:
                raise KeyPathError(("routes", index, "name"), f"duplicate route name {route.name!r}")
            if route.service not in self.catalog.static and not self._discoverable(route.service):
                raise KeyPathError(("routes", index, "service"), f"unknown service {route.service!r}")
        return self

    def _discoverable(self, service: str) -> bool:
        consul = self.discovery.consul
        return consul is not None and (consul.watch_tagged or any(s.name == service for s in consul.services))


class ConfigError(Exception):
    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def format_loc(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out or "(top level)"


def _messages(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, KeyPathError):
            lines.append(f"{format_loc(cause.loc)}: {cause}")
            continue
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p and "]" in p))
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        elif err["type"] == "missing":
            message = "required key is missing"
        lines.append(f"{format_loc(loc)}: {message}")
    return lines


def parse(data: Any) -> GatewayConfig:
    if not isinstance(data, dict):
        raise ConfigError(["(top level): expected a mapping of keys"])
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_messages(exc)) from None


def load(path: Path) -> GatewayConfig:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: invalid YAML: {exc}"]) from None
    config = parse(data)
    return resolve_paths(config, path.parent)


def resolve_paths(config: GatewayConfig, base: Path) -> GatewayConfig:
    """Relative file paths in the config are relative to the config file, as in nginx and Envoy."""

    def fix(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else (base / p)

    listeners = tuple(
        lst.model_copy(
            update={"tls": lst.tls.model_copy(update={"cert": fix(lst.tls.cert), "key": fix(lst.tls.key),
                                                      "client_ca": fix(lst.tls.client_ca)})}
        )
        if lst.tls
        else lst
        for lst in config.listeners
    )
    update: dict[str, Any] = {"listeners": listeners, "identity": resolve_identity_paths(config.identity, base),
                              "telemetry": resolve_telemetry_paths(config.telemetry, base),
                              "discovery": resolve_discovery_paths(config.discovery, base)}
    if config.authz is not None:
        update["authz"] = resolve_authz_paths(config.authz, base)
    return config.model_copy(update=update)
