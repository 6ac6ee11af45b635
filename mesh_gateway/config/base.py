"""Building blocks of the config models: the frozen base model, durations, host:port, SPIFFE IDs, key-path errors."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
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


_QUERY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def normalise_query(value: Any) -> str:
    """`envoy.authz.allow`, `envoy/authz/allow` and `data.envoy.authz.allow` all name the same rule."""
    text = str(value).strip().replace("/", ".")
    text = text if text.startswith("data.") else f"data.{text}"
    if not _QUERY.match(text):
        raise ValueError("expected a rule path such as data.envoy.authz.allow")
    return text


RegoQuery = Annotated[str, BeforeValidator(normalise_query)]


class KeyPathError(ValueError):
    """A cross-field error that knows which key it is about."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


def under(base: Path, path: Path | None) -> Path | None:
    return path if path is None or path.is_absolute() else base / path
