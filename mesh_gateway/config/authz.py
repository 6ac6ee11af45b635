"""Authorization: engine, policies, remote OPA, decision log."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from mesh_gateway.config.base import (
    KeyPathError,
    Model,
    RegoQuery,
    under,
)


class OpaServer(Model):
    url: str = Field(pattern=r"^https?://[^/]+(/.*)?$")
    timeout_ms: int = Field(default=200, ge=1, le=60_000)
    ca_file: Path | None = None
    pool_size: int = Field(default=64, ge=1, le=4096)


class DecisionLogConfig(Model):
    sink: str = "stderr"
    """`stderr`, `off`, or a file path (appended to)."""
    redact_headers: tuple[str, ...] = ("authorization", "cookie", "proxy-authorization", "set-cookie")

    @field_validator("redact_headers")
    @classmethod
    def _lower(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(h.lower() for h in value)


class Authz(Model):
    engine: Literal["embedded", "opa", "none"] = "embedded"
    policies: Path = Path("policies")
    query: RegoQuery = "data.envoy.authz.allow"
    rego_version: Literal["v1", "v0"] = "v1"
    reload_poll_s: float = Field(default=0.25, gt=0, le=1.0)
    memoise: bool = True
    """Embedded engine: remember the results of a policy set that depends only on the input fields it reads
    (no clock, randomness or network built-ins), keyed by those fields, per revision (docs/authz.md)."""
    opa: OpaServer | None = None
    dry_run: bool = False
    decision_log: DecisionLogConfig = DecisionLogConfig()

    @model_validator(mode="after")
    def _opa_needs_server(self) -> Authz:
        if self.engine == "opa" and self.opa is None:
            raise KeyPathError(("authz", "opa"), "required when engine is 'opa'")
        return self


_AuthzSection = TypeVar("_AuthzSection", bound=Authz)


def resolve_authz_paths(authz: _AuthzSection, base: Path) -> _AuthzSection:
    opa = authz.opa
    if opa is not None:
        opa = opa.model_copy(update={"ca_file": under(base, opa.ca_file)})
    sink = authz.decision_log.sink
    if sink not in ("stderr", "off") and not Path(sink).is_absolute():
        sink = str(base / sink)
    return authz.model_copy(update={
        "policies": under(base, authz.policies), "opa": opa,
        "decision_log": authz.decision_log.model_copy(update={"sink": sink})})
