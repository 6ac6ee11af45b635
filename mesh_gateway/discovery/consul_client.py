"""The one place that speaks HTTP to the Consul agent: base URL, TLS, ACL token, datacenter, consistency mode.

Foreign failures become `ConsulError` subclasses here, so the watcher and registrar handle three cases only:
an ACL problem (an operator must act), anything else that failed (retry with backoff), and an answer.
"""

from __future__ import annotations

import json
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from mesh_gateway.config import Consul

log = logging.getLogger("mesh_gateway.discovery.consul")

MAX_ANSWER_BYTES = 32 * 1024 * 1024
"""A service list far beyond this is a broken agent or a hostile one; refusing it bounds our memory."""


class ConsulError(Exception):
    """Consul could not be asked or did not answer usefully; the caller keeps its last good state."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ConsulUnavailable(ConsulError):
    pass


class ConsulAclError(ConsulError):
    """403: the token is unknown ("ACL not found") or lacks a permission ("Permission denied")."""


@dataclass(frozen=True, slots=True)
class ConsulAnswer:
    index: int
    body: Any
    filtered_by_acls: bool
    known_leader: bool


def ssl_context(settings: Consul) -> ssl.SSLContext | None:
    if settings.scheme != "https":
        return None
    tls = settings.tls
    context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert_file is not None and tls.key_file is not None:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return context


class ConsulClient:
    """Owns one aiohttp session to the agent. `get` / `put` add the token, `dc` and `stale` to every request."""

    def __init__(self, settings: Consul, *, session: aiohttp.ClientSession | None = None) -> None:
        self._settings = settings
        self._base = f"{settings.scheme}://{settings.address}"
        self._ssl = ssl_context(settings)
        self._session = session
        self._own_session = session is None
        self._token = self._read_token()

    @property
    def settings(self) -> Consul:
        return self._settings

    def _read_token(self) -> str | None:
        if self._settings.token is not None:
            return self._settings.token.get_secret_value()
        path: Path | None = self._settings.token_file
        if path is None:
            return None
        try:
            token = path.read_text().strip()
        except OSError as exc:
            # A missing token file is an ACL problem the operator must fix, not a reason to crash.
            log.error("consul: cannot read token_file %s: %s", path, exc.strerror)
            return None
        return token or None

    def _headers(self) -> dict[str, str]:
        return {"X-Consul-Token": self._token} if self._token else {}

    def _session_or_new(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else False, limit=0)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def close(self) -> None:
        if self._session is not None and self._own_session:
            await self._session.close()
        self._session = None

    def _params(self, extra: dict[str, str]) -> dict[str, str]:
        params = dict(extra)
        if self._settings.datacenter:
            params["dc"] = self._settings.datacenter
        return params

    async def get(self, path: str, params: dict[str, str], *, timeout_s: float, read: bool = True) -> ConsulAnswer:
        query = self._params(params)
        if read and self._settings.stale:
            query["stale"] = ""
        _, text, headers = await self._request("GET", path, query, None, timeout_s)
        try:
            body = json.loads(text)
        except ValueError:
            raise ConsulUnavailable(f"GET {path}: answer is not JSON") from None
        try:
            index = int(headers.get("X-Consul-Index", "0"))
        except ValueError:
            raise ConsulUnavailable(f"GET {path}: X-Consul-Index is not a number") from None
        return ConsulAnswer(index=index, body=body,
                            filtered_by_acls=headers.get("X-Consul-Results-Filtered-By-ACLs", "") == "true",
                            known_leader=headers.get("X-Consul-KnownLeader", "true") == "true")

    async def put(self, path: str, body: Any = None, *, params: dict[str, str] | None = None,
                  timeout_s: float = 10.0) -> None:
        # Agent endpoints act on the local agent; `dc` does not apply to them.
        await self._request("PUT", path, dict(params or {}), body, timeout_s)

    async def _request(self, method: str, path: str, params: dict[str, str], body: Any,
                       timeout_s: float) -> tuple[int, str, dict[str, str]]:
        session = self._session_or_new()
        data = None if body is None else json.dumps(body)
        try:
            async with session.request(method, self._base + path, params=params, data=data,
                                       headers=self._headers(), timeout=aiohttp.ClientTimeout(total=timeout_s),
                                       ssl=self._ssl if self._ssl is not None else False,
                                       server_hostname=self._settings.tls.server_name if self._ssl else None) as resp:
                raw = await resp.content.read(MAX_ANSWER_BYTES + 1)
                if len(raw) > MAX_ANSWER_BYTES:
                    raise ConsulUnavailable(f"{method} {path}: answer larger than {MAX_ANSWER_BYTES} bytes")
                text = raw.decode("utf-8", "replace")
                status, headers = resp.status, dict(resp.headers)
        except TimeoutError:
            raise ConsulUnavailable(f"{method} {path}: no answer within {timeout_s:.1f}s") from None
        except aiohttp.ClientError as exc:
            raise ConsulUnavailable(f"{method} {path}: {type(exc).__name__}: {exc}") from None
        except ssl.SSLError as exc:
            raise ConsulUnavailable(f"{method} {path}: TLS: {exc}") from None
        if status == 403:
            # Re-read the token file so a rotated token is used on the next attempt.
            self._token = self._read_token()
            raise ConsulAclError(f"{method} {path}: 403 {text.strip()[:200]}", status)
        if status != 200:
            raise ConsulUnavailable(f"{method} {path}: HTTP {status} {text.strip()[:200]}", status)
        return status, text, headers
