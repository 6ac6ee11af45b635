"""A remote OPA server through its Data API: `POST /v1/data/<path>` with `{"input": ...}`.

One aiohttp session with a keep-alive pool; every call bounded by `timeout_s` (Envoy ext_authz's 200 ms
default). Whatever goes wrong (refused, reset, timeout, non-200, not JSON) is an EngineError so the authorizer
fails closed. `decision_id` comes back when OPA has decision logging enabled.
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Any

import aiohttp

from mesh_gateway.authz.rego import EngineError

MAX_RESPONSE_BYTES = 1024 * 1024


def query_to_path(query: str) -> str:
    """`data.envoy.authz.allow` → `envoy/authz/allow` (the Data API's URL path)."""
    return "/".join(query.split(".")[1:])


class OpaClient:
    name = "opa"

    def __init__(self, url: str, *, timeout_s: float = 0.2, ca_file: Path | None = None, pool_size: int = 64,
                 keepalive_s: float = 30.0) -> None:
        self._base = url.rstrip("/")
        self._timeout_s = timeout_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._ca_file = ca_file
        self._pool_size = pool_size
        self._keepalive_s = keepalive_s
        self._session: aiohttp.ClientSession | None = None

    @property
    def revision(self) -> str:
        return ""  # OPA reports its bundle revisions through its own status API, not per decision

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            tls: ssl.SSLContext | bool = False
            if self._base.startswith("https://"):
                tls = ssl.create_default_context(cafile=str(self._ca_file) if self._ca_file else None)
            connector = aiohttp.TCPConnector(limit=self._pool_size, keepalive_timeout=self._keepalive_s, ssl=tls)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout,
                                                  json_serialize=json.dumps)
        return self._session

    async def evaluate(self, query: str, document: dict[str, Any]) -> tuple[Any, str]:
        """The query's value (None when OPA says undefined) and OPA's decision_id (or "")."""
        url = f"{self._base}/v1/data/{query_to_path(query)}"
        try:
            async with self._open().post(url, json={"input": document}) as response:
                raw = await response.content.read(MAX_RESPONSE_BYTES + 1)
                if response.status != 200:
                    raise EngineError(f"OPA answered {response.status}: {raw[:200].decode('utf-8', 'replace')}")
        except TimeoutError:
            raise EngineError(f"OPA did not answer within {self._timeout_s * 1000:.0f} ms") from None
        except aiohttp.ClientError as exc:
            raise EngineError(f"OPA unreachable: {type(exc).__name__}: {exc}") from None
        if len(raw) > MAX_RESPONSE_BYTES:
            raise EngineError("OPA response too large")
        try:
            body = json.loads(raw)
        except ValueError:
            raise EngineError("OPA response is not JSON") from None
        if not isinstance(body, dict):
            raise EngineError("OPA response is not an object")
        decision_id = body.get("decision_id")
        return body.get("result"), decision_id if isinstance(decision_id, str) else ""

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
