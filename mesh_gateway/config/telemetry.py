"""Tracing, access log and metrics settings."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import (
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from mesh_gateway.config.base import (
    KeyPathError,
    Model,
    under,
)

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
            raise KeyPathError(("telemetry", "tracing", "max_export_batch_size"), "must not exceed max_queue_size")
        if self.ca_file is not None and not self.effective_endpoint.startswith("https://"):
            raise KeyPathError(("telemetry", "tracing", "ca_file"), "only used with an https:// endpoint")
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


def resolve_telemetry_paths(telemetry: Telemetry, base: Path) -> Telemetry:
    log = telemetry.access_log
    ca_file = telemetry.tracing.ca_file
    return telemetry.model_copy(update={
        "tracing": telemetry.tracing.model_copy(update={"ca_file": under(base, ca_file)}),
        "access_log": log if log.path == "-" else log.model_copy(update={"path": str(under(base, Path(log.path)))}),
    })
