"""Static settings from gateway.yaml: pydantic v2 models, frozen, unknown keys rejected.

`load(path)` returns a `GatewayConfig` or raises `ConfigError` whose lines each name a key path,
e.g. ``routes[1].match.path_prefix: must start with '/'``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

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
    protocol: Literal["http", "grpc"] = "http"
    """http: HTTP/1.1 + WebSocket, and HTTP/2 via ALPN on TLS; grpc: a grpc.aio server (see docs/protocols.md)."""
    http2: bool = True
    """Offer `h2` in ALPN next to `http/1.1` (TLS http listeners only)."""


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
                raise _KeyError(("identity", "consul"), "required when provider is consul")
            if self.issuer == "remote":
                raise _KeyError(("identity", "issuer"), "must be local when provider is consul")
        if self.issuer == "remote" and self.remote is None:
            raise _KeyError(("identity", "remote"), "required when issuer is remote")
        return self


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


_QUERY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def normalise_query(value: Any) -> str:
    """`envoy.authz.allow`, `envoy/authz/allow` and `data.envoy.authz.allow` all name the same rule."""
    text = str(value).strip().replace("/", ".")
    text = text if text.startswith("data.") else f"data.{text}"
    if not _QUERY.match(text):
        raise ValueError("expected a rule path such as data.envoy.authz.allow")
    return text


RegoQuery = Annotated[str, BeforeValidator(normalise_query)]


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


class Limits(Model):
    max_request_line_bytes: int = Field(default=8192, ge=256)
    max_header_bytes: int = Field(default=16384, ge=1024)
    max_headers: int = Field(default=100, ge=8)
    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=0)
    idle_timeout_s: float = Field(default=60.0, gt=0)
    """Also bounds how long a client may take to send its request head."""


class Upstream(Model):
    client: Literal["h1", "aiohttp"] = "h1"
    """HTTP/1.1 client for upstream requests: "h1" (asyncio + httptools, upstream/h1.py) or "aiohttp"."""
    connect_timeout_s: float = Field(default=2.0, gt=0)
    pool_size: int = Field(default=256, ge=1)
    keepalive_s: float = Field(default=30.0, gt=0)


class GrpcSettings(Model):
    max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    """Largest single message accepted from a client or an upstream."""
    max_concurrent_rpcs: int = Field(default=1000, ge=1)
    """Per grpc listener; beyond it calls fail fast with RESOURCE_EXHAUSTED."""
    max_channels: int = Field(default=256, ge=1)
    """Upstream channels kept (one per endpoint and credentials generation); the least recently used goes first."""
    channel_grace_s: float = Field(default=30.0, gt=0)
    """How long calls on a channel retired by rotation may run on before they are cancelled."""


class Http2Settings(Model):
    max_concurrent_streams: int = Field(default=100, ge=1)
    initial_window_bytes: int = Field(default=1024 * 1024, ge=65535, le=2**31 - 1)
    """Per-stream receive window: how much request body is buffered before the client must wait."""


class WebSocketSettings(Model):
    enabled: bool = True
    max_message_bytes: int = Field(default=1024 * 1024, ge=125)
    """Larger messages close the side that sent them with 1009 (message too big)."""
    idle_timeout_s: float = Field(default=300.0, gt=0)
    """No message either way for this long closes both sides with 1001 (going away)."""
    connect_timeout_s: float = Field(default=5.0, gt=0)


class Protocols(Model):
    grpc: GrpcSettings = GrpcSettings()
    http2: Http2Settings = Http2Settings()
    websocket: WebSocketSettings = WebSocketSettings()


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



Propagator = Literal["w3c", "b3", "b3multi"]
_DEFAULT_OTLP_ENDPOINT = {"otlp_grpc": "http://127.0.0.1:4317", "otlp_http": "http://127.0.0.1:4318/v1/traces"}


class Tracing(Model):
    exporter: Literal["otlp_grpc", "otlp_http", "none"] = "none"
    """Off unless asked for (no collector to fail against); `none` still propagates trace context upstream."""
    endpoint: str | None = None
    """Omitted → http://127.0.0.1:4317 (gRPC) or http://127.0.0.1:4318/v1/traces (HTTP). https:// → TLS."""
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    """Sent with every export (e.g. an API key); hidden from repr and /config."""
    ca_file: Path | None = None
    """PEM roots for an https:// collector; omitted → the system roots."""
    sampling_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    """Share of new traces recorded; a sampled or unsampled parent is always followed."""
    propagators: tuple[Propagator, ...] = ("w3c",)
    """Formats injected upstream; extraction always accepts W3C, baggage, B3 single and multi."""
    max_queue_size: int = Field(default=2048, ge=1)
    max_export_batch_size: int = Field(default=512, ge=1)
    export_delay_s: float = Field(default=1.0, gt=0, le=60)
    export_timeout_s: float = Field(default=10.0, gt=0, le=120)
    shutdown_timeout_s: float = Field(default=5.0, ge=0, le=60)

    @field_validator("endpoint")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("expected an http:// or https:// URL")
        return value

    @field_validator("propagators")
    @classmethod
    def _some_unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("give at least one of w3c, b3, b3multi")
        if len(set(value)) != len(value):
            raise ValueError("duplicate propagator")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Tracing:
        if self.max_export_batch_size > self.max_queue_size:
            raise _KeyError(("telemetry", "tracing", "max_export_batch_size"), "must not exceed max_queue_size")
        if self.ca_file is not None and not self.effective_endpoint.startswith("https://"):
            raise _KeyError(("telemetry", "tracing", "ca_file"), "only used with an https:// endpoint")
        return self

    @property
    def effective_endpoint(self) -> str:
        return self.endpoint or _DEFAULT_OTLP_ENDPOINT.get(self.exporter, "")


class AccessLog(Model):
    enabled: bool = True
    path: str = "-"
    """`-` → stdout; otherwise a file opened for append."""
    include_query: bool = False
    """Query strings often carry tokens, so they are left out unless asked for."""
    flush_interval_s: float = Field(default=1.0, gt=0, le=60)
    buffer_bytes: int = Field(default=65536, ge=0, le=16 * 1024 * 1024)


class Metrics(Model):
    enabled: bool = True


class Telemetry(Model):
    service_name: str = Field(default="mesh-gateway", min_length=1)
    tracing: Tracing = Tracing()
    access_log: AccessLog = AccessLog()
    metrics: Metrics = Metrics()


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
    opa: OpaServer | None = None
    dry_run: bool = False
    decision_log: DecisionLogConfig = DecisionLogConfig()

    @model_validator(mode="after")
    def _opa_needs_server(self) -> Authz:
        if self.engine == "opa" and self.opa is None:
            raise _KeyError(("authz", "opa"), "required when engine is 'opa'")
        return self


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
                    raise _KeyError(("listeners", index, "address"), "needs a fixed port when workers is not 1")
        if SpiffeId.parse(self.identity.spiffe_id).trust_domain != self.trust_domain:
            raise _KeyError(("identity", "spiffe_id"), f"must be in trust domain {self.trust_domain!r}")
        names = [listener.name for listener in self.listeners]
        for index, name in enumerate(names):
            if names.index(name) != index:
                raise _KeyError(("listeners", index, "name"), f"duplicate listener name {name!r}")
        for index, listener in enumerate(self.listeners):
            # grpcio's server credentials either require a client certificate or never ask for one.
            if listener.protocol == "grpc" and listener.tls is not None and listener.tls.client_auth == "optional":
                raise _KeyError(("listeners", index, "tls", "client_auth"),
                                "a grpc listener supports 'required' or 'none', not 'optional'")
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
    update: dict[str, Any] = {"listeners": listeners, "identity": resolve_identity_paths(config.identity, base),
                              "telemetry": resolve_telemetry_paths(config.telemetry, base),
                              "discovery": resolve_discovery_paths(config.discovery, base)}
    if config.authz is not None:
        update["authz"] = resolve_authz_paths(config.authz, base)
    return config.model_copy(update=update)


def resolve_discovery_paths(discovery: Discovery, base: Path) -> Discovery:
    watched = discovery.consul
    if watched is None:
        return discovery
    tls = watched.tls.model_copy(update={"ca_file": _under(base, watched.tls.ca_file),
                                         "cert_file": _under(base, watched.tls.cert_file),
                                         "key_file": _under(base, watched.tls.key_file)})
    return discovery.model_copy(update={"consul": watched.model_copy(
        update={"tls": tls, "token_file": _under(base, watched.token_file)})})


def resolve_identity_paths(identity: Identity, base: Path) -> Identity:
    remote = identity.remote and identity.remote.model_copy(update={
        "bundle": _under(base, identity.remote.bundle),
        "join_token_file": _under(base, identity.remote.join_token_file)})
    consul = identity.consul and identity.consul.model_copy(
        update={"token_file": _under(base, identity.consul.token_file)})
    return identity.model_copy(update={"ca_dir": _under(base, identity.ca_dir), "remote": remote, "consul": consul})


def resolve_telemetry_paths(telemetry: Telemetry, base: Path) -> Telemetry:
    log = telemetry.access_log
    ca_file = telemetry.tracing.ca_file
    return telemetry.model_copy(update={
        "tracing": telemetry.tracing.model_copy(update={"ca_file": _under(base, ca_file)}),
        "access_log": log if log.path == "-" else log.model_copy(update={"path": str(_under(base, Path(log.path)))}),
    })


_AuthzSection = TypeVar("_AuthzSection", bound=Authz)


def resolve_authz_paths(authz: _AuthzSection, base: Path) -> _AuthzSection:
    opa = authz.opa
    if opa is not None:
        opa = opa.model_copy(update={"ca_file": _under(base, opa.ca_file)})
    sink = authz.decision_log.sink
    if sink not in ("stderr", "off") and not Path(sink).is_absolute():
        sink = str(base / sink)
    return authz.model_copy(update={
        "policies": _under(base, authz.policies), "opa": opa,
        "decision_log": authz.decision_log.model_copy(update={"sink": sink})})


def _under(base: Path, path: Path | None) -> Path | None:
    return path if path is None or path.is_absolute() else base / path
