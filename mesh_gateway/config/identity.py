"""The gateway's identity: where its SVID comes from (local CA, remote issuer, Consul Connect CA)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import (
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from mesh_gateway.config.base import (
    Duration,
    HostPort,
    KeyPathError,
    Model,
    SpiffeIdText,
    under,
)


class RemoteIssuer(Model):
    """`identity.issuer: remote`: obtain the SVID from `mesh-gateway ca serve` over gRPC (docs/identity.md)."""

    address: HostPort
    """The issuer's mTLS listener (renewals)."""
    bootstrap_address: HostPort | None = None
    """The issuer's bootstrap listener (first SVID with a join token)."""
    server_name: str = Field(default="localhost", min_length=1)
    """A DNS name in the issuer's certificate, checked on connect."""
    bundle: Path | None = None
    """Trust bundle to verify the issuer on first contact; omitted → <ca_dir>/bundle.pem."""
    join_token_file: Path | None = None
    """File holding a one-time join token (`mesh-gateway ca token create`)."""
    timeout_s: float = Field(default=10.0, gt=0, le=120)


class ConsulCA(Model):
    """`identity.provider: consul`: the SVID comes from the local Consul agent's Connect CA."""

    address: str = Field(default="http://127.0.0.1:8500", pattern=r"^https?://[^/]+/?$")
    service: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """The service name Consul issues the leaf for (its SPIFFE ID must equal identity.spiffe_id)."""
    token: SecretStr | None = None
    token_file: Path | None = None
    wait_s: float = Field(default=300.0, gt=0, le=600)
    """Blocking-query wait for leaf and roots renewals."""

    @model_validator(mode="after")
    def _one_token_source(self) -> ConsulCA:
        if self.token is not None and self.token_file is not None:
            raise ValueError("give token or token_file, not both")
        return self


class Identity(Model):
    ca_dir: Path = Path("certs")
    spiffe_id: SpiffeIdText
    ttl: Duration = 3600.0
    dns: tuple[str, ...] = ("localhost",)
    provider: Literal["local", "consul"] = "local"
    """local: our CA (in-process or remote issuer); consul: Consul Connect CA."""
    issuer: Literal["local", "remote"] = "local"
    """With provider local: sign with ca_dir in-process, or ask `ca serve` (identity.remote)."""
    remote: RemoteIssuer | None = None
    consul: ConsulCA | None = None
    bundle_poll_s: float = Field(default=5.0, gt=0, le=300)
    """How often the trust bundle is re-read from the CA (root rotation reaches running gateways this fast)."""

    @field_validator("ttl")
    @classmethod
    def _at_least_a_minute(cls, value: float) -> float:
        if value < 60:
            raise ValueError("must be at least 1m")
        return value

    @model_validator(mode="after")
    def _source_settings(self) -> Identity:
        if self.provider == "consul":
            if self.consul is None:
                raise KeyPathError(("identity", "consul"), "required when provider is consul")
            if self.issuer == "remote":
                raise KeyPathError(("identity", "issuer"), "must be local when provider is consul")
        if self.issuer == "remote" and self.remote is None:
            raise KeyPathError(("identity", "remote"), "required when issuer is remote")
        return self


def resolve_identity_paths(identity: Identity, base: Path) -> Identity:
    remote = identity.remote and identity.remote.model_copy(update={
        "bundle": under(base, identity.remote.bundle),
        "join_token_file": under(base, identity.remote.join_token_file)})
    consul = identity.consul and identity.consul.model_copy(
        update={"token_file": under(base, identity.consul.token_file)})
    return identity.model_copy(update={"ca_dir": under(base, identity.ca_dir), "remote": remote, "consul": consul})
