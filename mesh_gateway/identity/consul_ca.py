"""Consul Connect CA as the identity source (`identity.provider: consul`).

The local Consul agent owns the leaf: `GET /v1/agent/connect/ca/leaf/<service>` returns the certificate and the
key it generated, and renews it on its own schedule; a blocking query on the leaf's index (`?index=N&wait=..`)
returns as soon as the agent has a new one. Roots come from `GET /v1/connect/ca/roots` (also watched). Every leaf is
validated exactly like one of our own (one URI SAN equal to identity.spiffe_id, not a CA, within validity, chains
to Consul's roots) before it is published, so the gateway interoperates with Consul's Envoy sidecars
(`spiffe://<uuid>.consul/ns/default/dc/dc1/svc/web`). A failing agent keeps the last good leaf.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mesh_gateway.identity.ca import CAError, cert_pem, validate_leaf
from mesh_gateway.identity.rotation import RotationStatus
from mesh_gateway.model import Credentials, SpiffeId
from mesh_gateway.watch import Watch

log = logging.getLogger("mesh_gateway.identity")

MAX_RESPONSE_BYTES = 1024 * 1024


class ConsulCAError(Exception):
    """The agent could not be asked, refused, or answered something unusable; the message is safe to log."""


@dataclass(frozen=True, slots=True)
class ConsulSettings:
    address: str
    """Base URL of the local agent, e.g. http://127.0.0.1:8500."""
    service: str
    token: str | None = None
    wait_s: float = 300.0
    timeout_s: float = 10.0
    retry_initial_s: float = 1.0
    retry_max_s: float = 30.0


@dataclass(frozen=True, slots=True)
class Roots:
    trust_domain: str
    certs: tuple[x509.Certificate, ...]
    intermediates: tuple[x509.Certificate, ...]
    index: int

    @property
    def bundle_pem(self) -> bytes:
        return b"".join(cert_pem(c) for c in self.certs)


class ConsulAgent:
    """The two Connect CA endpoints, with blocking queries and the ACL token. One aiohttp session."""

    def __init__(self, settings: ConsulSettings) -> None:
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            headers = {"X-Consul-Token": self.settings.token} if self.settings.token else {}
            self._session = aiohttp.ClientSession(base_url=self.settings.address.rstrip("/") + "/", headers=headers)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _get(self, path: str, index: int) -> tuple[Any, int]:
        params = {"index": str(index), "wait": f"{int(self.settings.wait_s)}s"} if index else {}
        # Consul adds up to wait/16 of jitter to a blocking query; the client timeout must outlast both.
        budget = (self.settings.wait_s * 17 / 16 if index else 0) + self.settings.timeout_s
        try:
            async with self._http().get(path, params=params, timeout=aiohttp.ClientTimeout(total=budget)) as resp:
                body = await resp.content.read(MAX_RESPONSE_BYTES + 1)
                if resp.status != 200:
                    text = body[:200].decode(errors="replace").strip()
                    raise ConsulCAError(f"GET /{path}: HTTP {resp.status}: {text}")
                if len(body) > MAX_RESPONSE_BYTES:
                    raise ConsulCAError(f"GET /{path}: response over {MAX_RESPONSE_BYTES} bytes")
                new_index = int(resp.headers.get("X-Consul-Index", "0"))
                if new_index <= 0:
                    # Without an index a blocking query cannot block: retrying would spin on the agent.
                    raise ConsulCAError(f"GET /{path}: answer without a valid X-Consul-Index")
                return json.loads(body), new_index
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ConsulCAError(f"GET /{path}: {type(exc).__name__}: {exc}") from None
        except ValueError as exc:
            raise ConsulCAError(f"GET /{path}: unparsable answer: {exc}") from None

    async def roots(self, index: int = 0) -> Roots:
        data, new_index = await self._get("v1/connect/ca/roots", index)
        try:
            certs: list[x509.Certificate] = []
            intermediates: list[x509.Certificate] = []
            for root in data["Roots"]:
                certs.extend(x509.load_pem_x509_certificates(root["RootCert"].encode()))
                for pem in root.get("IntermediateCerts") or ():
                    intermediates.extend(x509.load_pem_x509_certificates(pem.encode()))
            trust_domain = str(data["TrustDomain"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConsulCAError(f"connect CA roots: unexpected answer: {exc}") from None
        if not certs:
            raise ConsulCAError("connect CA roots: no roots")
        return Roots(trust_domain, tuple(certs), tuple(intermediates), new_index)

    async def leaf(self, index: int = 0) -> tuple[dict[str, Any], int]:
        data, new_index = await self._get(f"v1/agent/connect/ca/leaf/{quote(self.settings.service, safe='')}",
                                          index)
        if not isinstance(data, dict):
            raise ConsulCAError("connect CA leaf: unexpected answer")
        return data, new_index


def credentials_from_leaf(data: dict[str, Any], roots: Roots, expected: SpiffeId, now: float) -> Credentials:
    """Validate a leaf answer against the roots; CAError/ConsulCAError when it must not be used."""
    try:
        chain = x509.load_pem_x509_certificates(str(data["CertPEM"]).encode())
        key = serialization.load_pem_private_key(str(data["PrivateKeyPEM"]).encode(), password=None)
    except (KeyError, ValueError, TypeError) as exc:
        raise ConsulCAError(f"connect CA leaf: unusable certificate or key: {exc}") from None
    leaf = chain[0]
    if key.public_key() != leaf.public_key():
        raise ConsulCAError("connect CA leaf: private key does not match the certificate")
    intermediates = [*chain[1:], *(c for c in roots.intermediates if c not in chain)]
    validate_leaf(leaf, intermediates, roots.certs, expected, now=dt.datetime.fromtimestamp(now, dt.UTC))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return Credentials(spiffe_id=expected, cert_chain_pem=b"".join(cert_pem(c) for c in [leaf, *intermediates]),
                       key_pem=key_pem, bundle_pem=roots.bundle_pem, serial=leaf.serial_number,
                       not_before=leaf.not_valid_before_utc.timestamp(),
                       not_after=leaf.not_valid_after_utc.timestamp())


async def fetch_credentials(agent: ConsulAgent, expected: SpiffeId) -> Credentials:
    """The first leaf, for startup (no blocking)."""
    roots = await agent.roots()
    data, _ = await agent.leaf()
    return credentials_from_leaf(data, roots, expected, time.time())


class ConsulIdentity:
    """Background task: follow the agent's leaf and roots with blocking queries; publish validated credentials."""

    name = "consul"

    def __init__(self, agent: ConsulAgent, expected: SpiffeId, watch: Watch[Credentials], *,
                 rng: random.Random | None = None, on_result: Callable[[str], None] | None = None) -> None:
        self.agent = agent
        self.expected = expected
        self.watch = watch
        self.rng = rng or random.Random()
        self.on_result = on_result
        self._roots: Roots | None = None
        self._leaf_index = 0
        self._rotations = 0
        self._failures = 0
        self._consecutive = 0
        self._last_error = ""

    def ready(self) -> bool:
        return time.time() < self.watch.get().not_after

    def status(self) -> RotationStatus:
        creds = self.watch.get()
        now = time.time()
        return RotationStatus(
            spiffe_id=str(creds.spiffe_id), serial=creds.serial, not_before=creds.not_before,
            not_after=creds.not_after, seconds_to_expiry=max(0.0, creds.not_after - now),
            next_refresh_at=None, rotations_total=self._rotations, failures_total=self._failures,
            consecutive_failures=self._consecutive, last_error=self._last_error, ready=self.ready(),
            issuer=f"consul {self.agent.settings.address}")

    async def _step(self) -> None:
        roots = self._roots
        if roots is None:
            roots = self._roots = await self.agent.roots()
        data, index = await self.agent.leaf(self._leaf_index)
        # An index that goes backwards means the agent restarted or its state reset: start over (Consul docs).
        self._leaf_index = index if index >= self._leaf_index else 0
        current = self.watch.get()
        if data.get("SerialNumber") and _serial(data) == current.serial:
            return
        try:
            creds = credentials_from_leaf(data, roots, self.expected, time.time())
        except CAError:
            # The leaf may already be signed by a root we have not fetched yet (CA rotation in Consul).
            self._roots = roots = await self.agent.roots()
            creds = credentials_from_leaf(data, roots, self.expected, time.time())
        if self.watch.publish(creds):
            self._rotations += 1
            if self.on_result is not None:
                self.on_result("success")
            log.info("identity rotated spiffe_id=%s serial=%x not_after=%s (consul)", creds.spiffe_id, creds.serial,
                     dt.datetime.fromtimestamp(creds.not_after, dt.UTC).isoformat(timespec="seconds"),
                     extra={"event": "svid_rotated", "spiffe_id": str(creds.spiffe_id), "serial": f"{creds.serial:x}",
                            "previous_serial": f"{current.serial:x}", "issuer": "consul"})

    async def _follow_roots(self) -> None:
        backoff = 1.0
        while True:
            try:
                index = self._roots.index if self._roots else 0
                roots = await self.agent.roots(index)
                backoff = 1.0
            except ConsulCAError as exc:
                log.warning("consul roots watch failed: %s", exc, extra={"event": "bundle_refresh_failed"})
                await asyncio.sleep(backoff * (0.5 + self.rng.random() / 2))
                backoff = min(backoff * 2, self.agent.settings.retry_max_s)
                continue
            self._roots = roots if roots.index >= index else Roots(roots.trust_domain, roots.certs,
                                                                   roots.intermediates, 0)
            current = self.watch.get()
            if roots.bundle_pem != current.bundle_pem:
                self.watch.publish(Credentials(current.spiffe_id, current.cert_chain_pem, current.key_pem,
                                               roots.bundle_pem, current.serial, current.not_before,
                                               current.not_after))
                log.info("trust bundle updated from consul: %d roots", len(roots.certs),
                         extra={"event": "bundle_updated", "roots": len(roots.certs)})

    async def run(self) -> None:
        roots_task = asyncio.create_task(self._follow_roots(), name="consul-ca-roots")
        backoff = self.agent.settings.retry_initial_s
        try:
            while True:
                try:
                    await self._step()
                    self._consecutive = 0
                    self._last_error = ""
                    backoff = self.agent.settings.retry_initial_s
                except (ConsulCAError, CAError) as exc:
                    self._failures += 1
                    self._consecutive += 1
                    self._last_error = str(exc)
                    if self.on_result is not None:
                        self.on_result("failure")
                    expired = time.time() >= self.watch.get().not_after
                    log.log(logging.ERROR if expired else logging.WARNING, "consul leaf renewal failed%s: %s",
                            " and the current certificate has EXPIRED" if expired else "", exc,
                            extra={"event": "svid_renewal_failed", "issuer": "consul", "expired": expired})
                    self._leaf_index = 0
                    await asyncio.sleep(backoff * (0.5 + self.rng.random() / 2))
                    backoff = min(backoff * 2, self.agent.settings.retry_max_s)
        finally:
            roots_task.cancel()
            await asyncio.gather(roots_task, return_exceptions=True)
            await self.agent.close()


def _serial(data: dict[str, Any]) -> int:
    try:
        return int(str(data["SerialNumber"]).replace(":", ""), 16)
    except (KeyError, ValueError):
        return -1
