"""The shared vocabulary: frozen values validated when built. Imports nothing that does I/O."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

Headers = tuple[tuple[str, str], ...]
"""Header list with lower-cased names, in wire order; a name may repeat."""

_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]+$")
_PATH_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A SPIFFE ID (spiffe://trust-domain/path), validated per the SPIFFE-ID specification."""

    trust_domain: str
    path: str

    def __post_init__(self) -> None:
        if not self.trust_domain or not _TRUST_DOMAIN.match(self.trust_domain):
            raise ValueError(f"invalid trust domain {self.trust_domain!r}")
        if self.path:
            if not self.path.startswith("/"):
                raise ValueError("SPIFFE ID path must start with '/'")
            for segment in self.path[1:].split("/"):
                if segment in ("", ".", "..") or not _PATH_SEGMENT.match(segment):
                    raise ValueError(f"invalid SPIFFE ID path segment {segment!r}")

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        if not text.startswith("spiffe://"):
            raise ValueError(f"not a spiffe:// URI: {text!r}")
        rest = text[len("spiffe://") :]
        if any(c in rest for c in "?#%@:"):
            raise ValueError(f"SPIFFE ID must not carry port, userinfo, query, fragment or escapes: {text!r}")
        domain, slash, path = rest.partition("/")
        return cls(domain, slash + path)

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}{self.path}"

    def member_of(self, trust_domain: str) -> bool:
        return self.trust_domain == trust_domain


TlsMode = Literal["mtls", "tls", "plain"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One upstream instance. `spiffe_id` is the identity its certificate must carry (mtls/tls)."""

    address: str
    port: int
    spiffe_id: SpiffeId | None = None
    tls: TlsMode = "mtls"
    meta: tuple[tuple[str, str], ...] = ()
    # The endpoint's name in pools, counters and logs, read several times per request: built once.
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port out of range: {self.port}")
        if self.tls == "mtls" and self.spiffe_id is None:
            raise ValueError(f"endpoint {self.address}:{self.port} uses mtls but has no spiffe_id")
        host = f"[{self.address}]" if ":" in self.address else self.address
        object.__setattr__(self, "key", f"{host}:{self.port}")

    @property
    def authority(self) -> str:
        """host:port as it goes in a URL; IPv6 literals in brackets."""
        return self.key


@dataclass(frozen=True, slots=True)
class EndpointSet:
    """All healthy instances of one service, as one snapshot."""

    service: str
    endpoints: tuple[Endpoint, ...] = ()
    source: str = "static"


@dataclass(frozen=True, slots=True)
class Catalog:
    services: Mapping[str, EndpointSet] = field(default_factory=dict)

    def get(self, service: str) -> EndpointSet | None:
        return self.services.get(service)


PathKind = Literal["prefix", "exact", "regex"]


@dataclass(frozen=True, slots=True)
class RouteMatch:
    host: str = "*"
    path_kind: PathKind = "prefix"
    path: str = "/"
    methods: frozenset[str] = frozenset()
    headers: tuple[tuple[str, str], ...] = ()
    grpc_service: str | None = None
    grpc_method: str | None = None


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    """Per-route knobs the pipeline reads; defaults are the safe ones."""

    timeout_s: float = 15.0
    connect_timeout_s: float = 2.0
    idle_timeout_s: float = 60.0
    max_body_bytes: int = 10 * 1024 * 1024
    retries: int = 1
    per_try_timeout_s: float | None = None
    upstream_security: TlsMode = "mtls"
    load_balancing: Literal["round_robin", "least_request"] | None = None
    authz_enabled: bool = True
    authz_failure_mode_allow: bool = False
    authz_dry_run: bool = False
    authz_query: str | None = None
    authz_include_body_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    match: RouteMatch
    service: str
    policy: RoutePolicy = RoutePolicy()
    source: str = "file"


@dataclass(frozen=True, slots=True)
class RouteTable:
    routes: tuple[Route, ...] = ()


@dataclass(frozen=True, slots=True)
class PeerCert:
    """What the edge learned from the client's TLS handshake."""

    spiffe_id: SpiffeId | None
    der: bytes | None = None


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """Everything about an inbound request except its body; built once by the edge."""

    method: str
    path: str
    query: str
    host: str
    scheme: str
    headers: Headers
    client_address: str
    client_port: int
    request_id: str
    protocol: str = "HTTP/1.1"
    listener: str = ""
    local_address: str = ""
    local_port: int = 0
    peer: PeerCert | None = None
    sni: str | None = None
    content_length: int | None = None
    is_grpc: bool = False

    @property
    def peer_spiffe_id(self) -> SpiffeId | None:
        return self.peer.spiffe_id if self.peer else None

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def target(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path


Body = AsyncIterator[bytes]


@dataclass(frozen=True, slots=True)
class BodyPrefix:
    """The first bytes of a request body, buffered for a policy that reads it (`input.parsed_body`)."""

    data: bytes
    truncated: bool


@dataclass(frozen=True, slots=True)
class Decision:
    """A parsed authorization decision; see authz/decision.py for the strict parser."""

    allowed: bool
    http_status: int | None = None
    body: str | None = None
    headers: Headers = ()
    response_headers_to_add: Headers = ()
    request_headers_to_remove: tuple[str, ...] = ()
    decision_id: str = ""
    policy_revision: str = ""
    engine: str = ""
    dry_run: bool = False


ALLOW_UNCHECKED = Decision(allowed=True, engine="disabled")


@dataclass(slots=True)
class Response:
    """What the pipeline hands back to the edge. `body` is bytes or a stream the edge drains."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes | Body = b""
    upstream_endpoint: str | None = None


@dataclass(frozen=True, slots=True)
class Credentials:
    """An X.509 SVID with its private key and the trust bundle it chains to. The key never reaches repr or logs."""

    spiffe_id: SpiffeId
    cert_chain_pem: bytes
    key_pem: bytes = field(repr=False)
    bundle_pem: bytes
    serial: int
    not_before: float
    not_after: float
