"""Consul discovery and the resilience settings (outlier ejection, circuits, retries)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from mesh_gateway.config.base import (
    Duration,
    HostPort,
    Model,
    under,
)

ConsulName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")]


class ConsulTls(Model):
    ca_file: Path | None = None
    """PEM bundle that signed the Consul agent's HTTPS certificate; omitted → the system trust store."""
    cert_file: Path | None = None
    key_file: Path | None = None
    """Client certificate for agents with verify_incoming on the HTTPS port."""
    server_name: str | None = None

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> ConsulTls:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        return self


class ConsulService(Model):
    name: ConsulName
    mode: Literal["connect", "tls", "plain"] = "connect"
    """connect → the service's Connect sidecars (or native instances) over mTLS with the expected SPIFFE ID;
    tls / plain → the instances themselves, one-way TLS or plaintext (an explicit opt-out of mTLS)."""


class ConsulRegister(Model):
    enabled: bool = False
    service_name: ConsulName = "mesh-gateway"
    service_id: ConsulName | None = None
    """Omitted → <service_name>-<address>-<port>."""
    address: str | None = None
    """Omitted → the first listener's address."""
    port: int | None = Field(default=None, ge=1, le=65535)
    """Omitted → the first listener's port."""
    tags: tuple[str, ...] = ()
    meta: dict[str, str] = Field(default_factory=dict)
    check: Literal["http", "ttl"] = "http"
    """http → Consul polls the admin listener's /readyz; ttl → the gateway reports in every ttl_s/2."""
    interval_s: Duration = 10.0
    ttl_s: Duration = 15.0
    deregister_critical_after_s: Duration = 600.0

    @field_validator("deregister_critical_after_s")
    @classmethod
    def _consul_minimum(cls, value: float) -> float:
        if value < 60:
            raise ValueError("Consul's minimum is 1m")
        return value


class Consul(Model):
    address: HostPort = "127.0.0.1:8500"
    scheme: Literal["http", "https"] = "http"
    token: SecretStr | None = None
    token_file: Path | None = None
    """Re-read after an ACL error, so a rotated token is picked up without a restart."""
    datacenter: ConsulName | None = None
    tls: ConsulTls = ConsulTls()
    stale: bool = False
    """Allow any server to answer reads (scales reads, keeps discovery working without a leader)."""
    wait_s: Duration = 300.0
    rate_limit_per_s: float = Field(default=2.0, gt=0)
    retry_base_s: Duration = 0.5
    retry_max_s: Duration = 30.0
    services: tuple[ConsulService, ...] = ()
    watch_tagged: bool = True
    """Also watch every service tagged mesh-gateway.enable=true, and build routes from its tags."""
    identity_source: Literal["gateway_ca", "consul_ca"] = "gateway_ca"
    """gateway_ca → expect Meta["spiffe_id"] (in our trust domain); consul_ca → Consul's Connect SPIFFE IDs."""
    consul_trust_domain: str | None = Field(default=None, pattern=r"^[a-z0-9._-]+$")
    """Trust domain of Consul's Connect CA (<cluster id>.consul); needed with identity_source consul_ca."""
    namespace: ConsulName = "default"
    registration: ConsulRegister = ConsulRegister()

    @field_validator("wait_s")
    @classmethod
    def _consul_wait_limit(cls, value: float) -> float:
        if value > 600:
            raise ValueError("Consul caps wait at 10m")
        return value

    @model_validator(mode="after")
    def _checks(self) -> Consul:
        if self.token is not None and self.token_file is not None:
            raise ValueError("give token or token_file, not both")
        if self.identity_source == "consul_ca" and self.consul_trust_domain is None:
            raise ValueError("consul_trust_domain is required when identity_source is consul_ca")
        names = [s.name for s in self.services]
        for index, name in enumerate(names):
            if names.index(name) != index:
                raise ValueError(f"services[{index}].name: duplicate service {name!r}")
        return self


class Discovery(Model):
    consul: Consul | None = None


class Outlier(Model):
    consecutive_failures: int = Field(default=5, ge=1)
    base_ejection_s: Duration = 30.0
    max_ejection_s: Duration = 300.0
    max_ejection_percent: int = Field(default=50, ge=0, le=100)


class ServiceResilience(Model):
    load_balancing: Literal["round_robin", "least_request"] | None = None
    max_concurrent: int | None = Field(default=None, ge=1)
    max_pending: int = Field(default=0, ge=0)
    """Requests that may wait for a free slot once max_concurrent are in flight; more are refused with 503."""


class Resilience(Model):
    load_balancing: Literal["round_robin", "least_request"] = "round_robin"
    outlier: Outlier = Outlier()
    retry_backoff_s: Duration = 0.025
    """Base of the jittered backoff between retries (doubles per retry)."""
    max_replay_bytes: int = Field(default=64 * 1024, ge=0)
    """Request bodies up to this size are kept so an idempotent request can be retried after a reset."""
    services: dict[str, ServiceResilience] = Field(default_factory=dict)


def resolve_discovery_paths(discovery: Discovery, base: Path) -> Discovery:
    watched = discovery.consul
    if watched is None:
        return discovery
    tls = watched.tls.model_copy(update={"ca_file": under(base, watched.tls.ca_file),
                                         "cert_file": under(base, watched.tls.cert_file),
                                         "key_file": under(base, watched.tls.key_file)})
    return discovery.model_copy(update={"consul": watched.model_copy(
        update={"tls": tls, "token_file": under(base, watched.token_file)})})
