"""sidecar.yaml: the static settings of `mesh-gateway sidecar`, validated like gateway.yaml (frozen, unknown keys
rejected, errors naming the key path). Sections shared with the gateway reuse its models from config.py.

A sidecar config is told apart from a gateway config by its required top-level `service` key.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from mesh_gateway import config as cfg
from mesh_gateway.model import SpiffeId

_SERVICE_NAME = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class LocalService(cfg.Model):
    """The one application this sidecar fronts. It listens on loopback and speaks plain HTTP to the sidecar."""

    name: str = Field(pattern=_SERVICE_NAME)
    address: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)
    protocol: Literal["http", "grpc"] = "http"
    """`grpc`: the inbound listener speaks gRPC (mTLS) and the app plaintext gRPC (h2c) on this port."""
    timeout_s: float = Field(default=15.0, gt=0)
    """Whole-request budget for a call into the local app."""
    probe_interval_s: float = Field(default=5.0, gt=0, le=300)
    """How often the sidecar checks that the app accepts connections; while it does not, /readyz says so."""

    @field_validator("address")
    @classmethod
    def _loopback(cls, value: str) -> str:
        # Plain HTTP leaves the sidecar only towards the app beside it; anything else would be a cleartext hop.
        if not _is_loopback(value):
            raise ValueError("must be a loopback address (127.0.0.1, ::1 or localhost)")
        return value


class Inbound(cfg.Model):
    """The mTLS listener other mesh members call. A client certificate from the mesh is always required."""

    address: cfg.HostPort = "0.0.0.0:15443"
    min_version: Literal["1.2", "1.3"] = "1.2"
    allowed_peers: tuple[cfg.SpiffeIdText, ...] = ()
    """If given, only these SPIFFE IDs may call in (checked before the policy); empty → any peer of the trust
    domain, and the policy (`authz:`) decides."""


class Outbound(cfg.Model):
    """The loopback listener the app calls other mesh services through: http://<address>/<service>/<path>."""

    enabled: bool = True
    address: cfg.HostPort = "127.0.0.1:15001"
    timeout_s: float = Field(default=15.0, gt=0)
    retries: int = Field(default=1, ge=0, le=5)

    @field_validator("address")
    @classmethod
    def _loopback(cls, value: str) -> str:
        # Whoever can reach this port speaks with the service's identity: it must not leave the host/pod.
        if not _is_loopback(cfg.split_host_port(value)[0]):
            raise ValueError("must be a loopback address: the outbound listener lends the service's identity")
        return value


class SidecarAuthz(cfg.Authz):
    """The gateway's `authz:` section; only the default query differs, because the sidecar's policy is about who
    may call this service, not about edge traffic."""

    query: cfg.RegoQuery = "data.mesh.inbound.allow"


class SidecarTelemetry(cfg.Telemetry):
    service_name: str = ""
    """Omitted → `<service.name>-sidecar`, so each sidecar is its own service in Jaeger."""


class SidecarConfig(cfg.Model):
    trust_domain: str = Field(pattern=r"^[a-z0-9._-]+$")
    service: LocalService
    identity: cfg.Identity
    """The gateway's identity section: the sidecar presents `spiffe_id` (the service's identity) on both sides.
    Prefer `issuer: remote` (join token, then mTLS renewals: the CA key never leaves `ca serve`)."""
    inbound: Inbound = Inbound()
    outbound: Outbound = Outbound()
    catalog: cfg.Catalog = cfg.Catalog()
    """Where the mesh services the app calls out to live (their sidecars' inbound listeners)."""
    admin: cfg.Admin = cfg.Admin(address="127.0.0.1:15000")
    limits: cfg.Limits = cfg.Limits()
    upstream: cfg.Upstream = cfg.Upstream()
    grpc: cfg.GrpcSettings = cfg.GrpcSettings()
    """Used when `service.protocol` is grpc."""
    consul: cfg.Consul | None = None
    """The local Consul agent: `services` (mode connect) become callable through the outbound listener, found at
    their sidecars; with `registration.enabled` the sidecar registers the service and itself as its connect-proxy."""
    resilience: cfg.Resilience = cfg.Resilience()
    """Outbound: balancing, outlier ejection, retries to another instance (as in gateway.yaml)."""
    drain_timeout_s: float = Field(default=15.0, ge=0)
    telemetry: SidecarTelemetry = SidecarTelemetry()
    authz: SidecarAuthz | None = None
    """Absent → the inbound decision is the peer check alone (`inbound.allowed_peers`), logged at start-up."""

    @property
    def service_name(self) -> str:
        return self.telemetry.service_name or f"{self.service.name}-sidecar"

    @model_validator(mode="after")
    def _cross_checks(self) -> SidecarConfig:
        if SpiffeId.parse(self.identity.spiffe_id).trust_domain != self.trust_domain:
            raise cfg._KeyError(("identity", "spiffe_id"), f"must be in trust domain {self.trust_domain!r}")
        for index, peer in enumerate(self.inbound.allowed_peers):
            if SpiffeId.parse(peer).trust_domain != self.trust_domain:
                raise cfg._KeyError(("inbound", "allowed_peers", index),
                                    f"must be in trust domain {self.trust_domain!r}")
        if self.consul is not None:
            for index, watched in enumerate(self.consul.services):
                if watched.mode != "connect":
                    raise cfg._KeyError(("consul", "services", index, "mode"),
                                        "outbound mesh services must be connect (mTLS to their sidecars)")
            given = self.consul.registration.model_fields_set & {"service_name", "service_id", "port"}
            if given:
                key = sorted(given)[0]
                raise cfg._KeyError(("consul", "registration", key),
                                    "set by the sidecar: it registers service.name and <name>-sidecar-proxy")
        for name, endpoints in self.catalog.static.items():
            for index, endpoint in enumerate(endpoints):
                if endpoint.tls != "mtls":
                    # The outbound listener exists to add mTLS; a cleartext mesh call would defeat it.
                    raise cfg._KeyError(("catalog", "static", name, index, "tls"),
                                        "outbound mesh services must use mtls")
        return self


def is_sidecar_document(data: Any) -> bool:
    return isinstance(data, dict) and "service" in data


def parse(data: Any) -> SidecarConfig:
    if not isinstance(data, dict):
        raise cfg.ConfigError(["(top level): expected a mapping of keys"])
    try:
        return SidecarConfig.model_validate(data)
    except ValidationError as exc:
        raise cfg.ConfigError(cfg._messages(exc)) from None


def read_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as exc:
        raise cfg.ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise cfg.ConfigError([f"{path}: invalid YAML: {exc}"]) from None


def load(path: Path) -> SidecarConfig:
    """Relative paths are relative to the config file, as for gateway.yaml."""
    config = parse(read_yaml(path))
    base = path.parent
    update: dict[str, Any] = {
        "identity": cfg.resolve_identity_paths(config.identity, base),
        "telemetry": cfg.resolve_telemetry_paths(config.telemetry, base),
    }
    if config.authz is not None:
        update["authz"] = cfg.resolve_authz_paths(config.authz, base)
    if config.consul is not None:
        update["consul"] = cfg.resolve_discovery_paths(cfg.Discovery(consul=config.consul), base).consul
    return config.model_copy(update=update)
