"""A fake Consul agent for the Connect CA endpoints, as a real HTTP server on 127.0.0.1 (blocking queries, ACLs).

  GET /v1/connect/ca/roots                     roots with TrustDomain, IntermediateCerts; X-Consul-Index
  GET /v1/agent/connect/ca/leaf/<service>      CertPEM + PrivateKeyPEM for spiffe://<td>/ns/default/dc/dc1/svc/<s>
Both honour `?index=N&wait=Ns`: with N equal to the current index the answer waits for a change (or the wait).
The CA behind it is our own CA module, under a `<uuid>.consul` trust domain like Consul's built-in provider.
Separate from tests/fakes/consul.py (health/catalog), which another part of the suite owns.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from mesh_gateway.identity.ca import CertificateAuthority, cert_pem, init_ca
from mesh_gateway.identity.ca_rotation import rotate_root
from mesh_gateway.model import Credentials, SpiffeId


def _wait_s(text: str | None) -> float:
    if not text:
        return 300.0
    for unit, factor in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor
    return float(text)


@dataclass
class FakeConsulCA:
    directory: Path
    token: str | None = None
    leaf_ttl_s: float = 3600.0
    trust_domain: str = field(default_factory=lambda: f"{uuid.uuid4()}.consul")
    index: int = 1
    leaves: dict[str, tuple[Credentials, int]] = field(default_factory=dict)
    roots_index: int = 1
    requests: list[tuple[str, dict[str, str], str | None]] = field(default_factory=list)
    ca: CertificateAuthority | None = None
    fail_with: int | None = None

    def __post_init__(self) -> None:
        self.ca = init_ca(self.directory, self.trust_domain)
        self._changed = asyncio.Condition()
        self.runner: web.AppRunner | None = None
        self.port = 0

    def spiffe_id(self, service: str) -> SpiffeId:
        return SpiffeId(self.trust_domain, f"/ns/default/dc/dc1/svc/{service}")

    async def _bump(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def rotate_leaf(self, service: str) -> Credentials:
        assert self.ca is not None
        self.index += 1
        creds = self.ca.issue_credentials(self.spiffe_id(service), self.leaf_ttl_s)
        self.leaves[service] = (creds, self.index)
        await self._bump()
        return creds

    async def rotate_roots(self) -> None:
        self.ca = rotate_root(self.directory, max_leaf_ttl_s=self.leaf_ttl_s)
        self.index += 1
        self.roots_index = self.index
        await self._bump()

    async def _block(self, request: web.Request, current: object) -> None:
        wanted = int(request.query.get("index", "0"))
        if wanted and wanted >= current():  # type: ignore[operator]
            deadline = asyncio.get_running_loop().time() + _wait_s(request.query.get("wait"))
            async with self._changed:
                while current() <= wanted:  # type: ignore[operator]
                    remaining = deadline - asyncio.get_running_loop().time()
                    if remaining <= 0:
                        break
                    try:
                        await asyncio.wait_for(self._changed.wait(), remaining)
                    except TimeoutError:
                        break

    def _denied(self, request: web.Request) -> web.Response | None:
        self.requests.append((request.path, dict(request.query), request.headers.get("X-Consul-Token")))
        if self.fail_with is not None:
            return web.Response(status=self.fail_with, text="agent unavailable")
        if self.token is not None and request.headers.get("X-Consul-Token") != self.token:
            return web.Response(status=403, text="Permission denied: token with AccessorID '' lacks permission")
        return None

    async def _roots(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        await self._block(request, lambda: self.roots_index)
        assert self.ca is not None
        last = len(self.ca.roots) - 1
        roots = [{"ID": f"{root.serial_number:x}", "Name": "Consul CA Primary Cert",
                  "RootCert": cert_pem(root).decode(),
                  "IntermediateCerts": [cert_pem(c).decode() for c in self.ca.chain] if i == last else [],
                  "Active": i == last}
                 for i, root in enumerate(self.ca.roots)]
        body = {"ActiveRootID": roots[-1]["ID"], "TrustDomain": self.trust_domain, "Roots": roots}
        return web.json_response(body, headers={"X-Consul-Index": str(self.roots_index)})

    async def _leaf(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        service = request.match_info["service"]
        if service not in self.leaves:
            await self.rotate_leaf(service)
        await self._block(request, lambda: self.leaves[service][1])
        creds, index = self.leaves[service]
        leaf_pem = creds.cert_chain_pem.split(b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n"
        serial = f"{creds.serial:x}"
        serial = ":".join(serial[i:i + 2] for i in range(0, len(serial), 2))
        body = {"SerialNumber": serial, "CertPEM": leaf_pem.decode(), "PrivateKeyPEM": creds.key_pem.decode(),
                "Service": service, "ServiceURI": str(self.spiffe_id(service)),
                "ValidAfter": dt.datetime.fromtimestamp(creds.not_before, dt.UTC).isoformat(),
                "ValidBefore": dt.datetime.fromtimestamp(creds.not_after, dt.UTC).isoformat(),
                "CreateIndex": index, "ModifyIndex": index}
        return web.json_response(body, headers={"X-Consul-Index": str(index)})

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/v1/connect/ca/roots", self._roots)
        app.router.add_get("/v1/agent/connect/ca/leaf/{service}", self._leaf)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{self.port}"

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
