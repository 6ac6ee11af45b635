"""Static settings from gateway.yaml: pydantic v2 models, frozen, unknown keys rejected.

`load(path)` returns a `GatewayConfig` or raises `ConfigError` whose lines each name a key path,
e.g. ``routes[1].match.path_prefix: must start with '/'``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from mesh_gateway.model import SpiffeId

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """`90`, `"90s"`, `"15m"`, `"1h"`, `"500ms"` → seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30s, 15m or 1h")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        found = _DURATION.match(value)
        if found:
            return float(found.group(1)) * _UNIT_S[found.group(2)]
    raise ValueError("expected a duration like 30s, 15m or 1h")


Duration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]


def _check_spiffe(value: str) -> str:
    SpiffeId.parse(value)
    return value


SpiffeIdText = Annotated[str, BeforeValidator(lambda v: _check_spiffe(str(v)))]


def _check_host_port(value: Any) -> str:
    text = str(value)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError("expected host:port, e.g. 127.0.0.1:8443")
    return text


HostPort = Annotated[str, BeforeValidator(_check_host_port)]


def split_host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


class Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ListenerTls(Model):
    cert: Path | None = None
    """PEM chain; omitted → the gateway's own rotating SVID."""
    key: Path | None = None
    client_ca: Path | None = None
    """PEM bundle clients are verified against; omitted → the mesh trust bundle."""
    client_auth: Literal["none", "optional", "required"] = "optional"
    min_version: Literal["1.2", "1.3"] = "1.2"

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> ListenerTls:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key must be given together")
        return self


class Listener(Model):
    name: str = Field(min_length=1)
    address: HostPort
    tls: ListenerTls | None = None
    """Omitted → plain HTTP (for local use behind another load balancer)."""


class Identity(Model):
    ca_dir: Path = Path("certs")
    spiffe_id: SpiffeIdText
    ttl: Duration = 3600.0
    dns: tuple[str, ...] = ("localhost",)

    @field_validator("ttl")
    @classmethod
    def _at_least_a_minute(cls, value: float) -> float:
        if value < 60:
            raise ValueError("must be at least 1m")
        return value


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


class RouteMatch(Model):
    host: str = "*"
    path_prefix: str | None = None
    path: str | None = None
    path_regex: str | None = None
    methods: tuple[str, ...] = ()
    headers: dict[str, str] = Field(default_factory=dict)

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


class Limits(Model):
    max_request_line_bytes: int = Field(default=8192, ge=256)
    max_header_bytes: int = Field(default=16384, ge=1024)
    max_headers: int = Field(default=100, ge=8)
    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=0)
    idle_timeout_s: float = Field(default=60.0, gt=0)
    """Also bounds how long a client may take to send its request head."""


class Upstream(Model):
    connect_timeout_s: float = Field(default=2.0, gt=0)
    pool_size: int = Field(default=256, ge=1)
    keepalive_s: float = Field(default=30.0, gt=0)


class Admin(Model):
    address: HostPort = "127.0.0.1:9901"


# ---- discovery (Consul) and resilience ----------------------------------------------------------------------

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



class GatewayConfig(Model):
    trust_domain: str = Field(pattern=r"^[a-z0-9._-]+$")
    listeners: tuple[Listener, ...] = Field(min_length=1)
    identity: Identity
    catalog: Catalog = Catalog()
    routes: tuple[Route, ...] = ()
    admin: Admin = Admin()
    limits: Limits = Limits()
    upstream: Upstream = Upstream()
    drain_timeout_s: float = Field(default=15.0, ge=0)
    discovery: Discovery = Discovery()
    resilience: Resilience = Resilience()

    @model_validator(mode="after")
    def _cross_checks(self) -> GatewayConfig:
        if SpiffeId.parse(self.identity.spiffe_id).trust_domain != self.trust_domain:
            raise _KeyError(("identity", "spiffe_id"), f"must be in trust domain {self.trust_domain!r}")
        names = [listener.name for listener in self.listeners]
        for index, name in enumerate(names):
            if names.index(name) != index:
                raise _KeyError(("listeners", index, "name"), f"duplicate listener name {name!r}")
        route_names = [route.name for route in self.routes]
        for index, route in enumerate(self.routes):
            if route_names.index(route.name) != index:
                raise _KeyError(("routes", index, "name"), f"duplicate route name {route.name!r}")
            if route.service not in self.catalog.static and not self._discoverable(route.service):
                raise _KeyError(("routes", index, "service"), f"unknown service {route.service!r}")
        return self

    def _discoverable(self, service: str) -> bool:
        consul = self.discovery.consul
        return consul is not None and (consul.watch_tagged or any(s.name == service for s in consul.services))


class _KeyError(ValueError):
    """A cross-field error that knows which key it is about."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


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
        if isinstance(cause, _KeyError):
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
    identity = config.identity.model_copy(update={"ca_dir": fix(config.identity.ca_dir)})
    discovery = config.discovery
    if discovery.consul is not None:
        consul = discovery.consul
        tls = consul.tls.model_copy(update={"ca_file": fix(consul.tls.ca_file), "cert_file": fix(consul.tls.cert_file),
                                            "key_file": fix(consul.tls.key_file)})
        discovery = discovery.model_copy(update={"consul": consul.model_copy(
            update={"tls": tls, "token_file": fix(consul.token_file)})})
    return config.model_copy(update={"listeners": listeners, "identity": identity, "discovery": discovery})
