"""Listeners, limits, upstream client settings, protocol settings and the admin port."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import (
    Field,
    model_validator,
)

from mesh_gateway.config.base import (
    HostPort,
    Model,
)


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
    server: Literal["h1", "aiohttp"] = "h1"
    """HTTP/1.1 server: "h1" (httptools on asyncio, edges/h1_server.py) or "aiohttp" (about twice the CPU per
    request). WebSocket upgrades are served by aiohttp either way."""


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
