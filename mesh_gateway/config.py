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


class Admin(Model):
    address: HostPort = "127.0.0.1:9901"


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
    workers: int | Literal["auto"] = Field(default=1)
    """Gateway processes sharing the listeners via SO_REUSEPORT; "auto" = one per usable CPU (see workers.py)."""

    @field_validator("workers")
    @classmethod
    def _worker_count(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 64:
            raise ValueError("must be between 1 and 64, or 'auto'")
        return value

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
        route_names = [route.name for route in self.routes]
        for index, route in enumerate(self.routes):
            if route_names.index(route.name) != index:
                raise _KeyError(("routes", index, "name"), f"duplicate route name {route.name!r}")
            if route.service not in self.catalog.static:
                raise _KeyError(("routes", index, "service"), f"unknown service {route.service!r}")
        return self


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
    return config.model_copy(update={"listeners": listeners, "identity": identity})
