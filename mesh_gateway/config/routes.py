"""The static catalog and routes, with their per-route authorization and resilience options."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Field,
    field_validator,
    model_validator,
)

from mesh_gateway.config.base import (
    Model,
    RegoQuery,
    SpiffeIdText,
)


class StaticEndpoint(Model):
    address: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    spiffe_id: SpiffeIdText | None = None
    tls: Literal["mtls", "tls", "plain"] = "mtls"

    @model_validator(mode="after")
    def _mtls_needs_identity(self) -> StaticEndpoint:
        if self.tls != "plain" and self.spiffe_id is None:
            raise ValueError("spiffe_id is required unless tls is 'plain'")
        return self


class Catalog(Model):
    static: dict[str, tuple[StaticEndpoint, ...]] = Field(default_factory=dict)


class GrpcMatch(Model):
    service: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
    """Fully qualified service name, e.g. `pkg.Service`."""
    method: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """Omitted → every method of the service."""


class RouteMatch(Model):
    host: str = "*"
    path_prefix: str | None = None
    path: str | None = None
    path_regex: str | None = None
    methods: tuple[str, ...] = ()
    headers: dict[str, str] = Field(default_factory=dict)
    grpc: GrpcMatch | None = None

    @field_validator("path_prefix", "path")
    @classmethod
    def _starts_with_slash(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError("must start with '/'")
        return value

    @field_validator("path_regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regular expression: {exc}") from None
        return value

    @field_validator("methods")
    @classmethod
    def _upper(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(m.upper() for m in value)

    @model_validator(mode="after")
    def _one_path_kind(self) -> RouteMatch:
        given = [k for k in ("path_prefix", "path", "path_regex") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of path_prefix, path, path_regex (got {', '.join(given)})")
        if self.grpc is not None and given:
            raise ValueError(f"grpc matches on /service/method already; drop {given[0]}")
        return self


class RouteAuthzCache(Model):
    ttl_s: float = Field(default=5.0, gt=0, le=3600)
    max_entries: int = Field(default=10_000, ge=1, le=1_000_000)
    headers: tuple[str, ...] = ()
    """Request headers whose values join the cache key (lower-cased)."""

    @field_validator("headers")
    @classmethod
    def _lower(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(h.lower() for h in value)


def _route_authz_shorthand(value: Any) -> Any:
    return {"disabled": True} if value == "disabled" else value


class RouteAuthz(Model):
    disabled: bool = False
    failure_mode_allow: bool = False
    dry_run: bool = False
    query: RegoQuery | None = None
    include_body_bytes: int = Field(default=0, ge=0, le=1024 * 1024)
    cache: RouteAuthzCache | None = None

    @model_validator(mode="after")
    def _body_not_cached(self) -> RouteAuthz:
        if self.cache is not None and self.include_body_bytes:
            raise ValueError("cache cannot be combined with include_body_bytes (the body is not in the cache key)")
        return self


class Route(Model):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    match: RouteMatch = RouteMatch()
    service: str = Field(min_length=1)
    timeout_s: float = Field(default=15.0, gt=0)
    connect_timeout_s: float = Field(default=2.0, gt=0)
    idle_timeout_s: float = Field(default=60.0, gt=0)
    max_body_bytes: int | None = Field(default=None, ge=0)
    retries: int = Field(default=1, ge=0, le=5)
    per_try_timeout_s: float | None = Field(default=None, gt=0)
    """Bound on each upstream attempt when retries are on; omitted → timeout_s."""
    upstream_security: Literal["mtls", "tls", "plain"] = "mtls"
    """Weakest transport accepted to Consul-discovered endpoints: a service registered for plaintext or one-way
    TLS is reachable only through a route that says so (static endpoints are explicit already)."""
    load_balancing: Literal["round_robin", "least_request"] | None = None
    """Overrides resilience.services.<service>.load_balancing and resilience.load_balancing for this route."""
    authz: Annotated[RouteAuthz, BeforeValidator(_route_authz_shorthand)] = RouteAuthz()
