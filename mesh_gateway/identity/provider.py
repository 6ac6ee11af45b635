"""Where the gateway's SVID comes from, chosen by `identity.provider` / `identity.issuer`, and what /certs shows.

  provider local, issuer local   sign in-process with identity.ca_dir (the default)
  provider local, issuer remote  ask `mesh-gateway ca serve` over gRPC: join token once, then mTLS renewals
  provider consul                the local Consul agent's Connect CA leaf (blocking queries)
Each yields a background task with `run()`, `ready()` and `status()` (the numbers the metrics code reads).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mesh_gateway import config as cfg
from mesh_gateway.identity.ca import CAError, load_ca
from mesh_gateway.identity.consul_ca import (
    ConsulAgent,
    ConsulCAError,
    ConsulIdentity,
    ConsulSettings,
    fetch_credentials,
)
from mesh_gateway.identity.issuer_api import IssuerClient
from mesh_gateway.identity.local_issuer import LocalIssuer
from mesh_gateway.identity.rotation import IssuerError, RotationStatus, Rotator, obtain_credentials
from mesh_gateway.model import Credentials, SpiffeId
from mesh_gateway.watch import Watch


class IdentityUnavailable(Exception):
    """The first SVID could not be obtained; the message says why in one line."""


class IdentitySource(Protocol):
    async def run(self) -> None: ...

    def ready(self) -> bool: ...

    def status(self) -> RotationStatus: ...


def _read_secret(path: Path, what: str) -> str:
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise IdentityUnavailable(f"{what} {path}: {exc.strerror}") from None
    if not value:
        raise IdentityUnavailable(f"{what} {path} is empty")
    return value


def consul_settings(consul: cfg.ConsulCA) -> ConsulSettings:
    token = consul.token.get_secret_value() if consul.token else None
    if consul.token_file is not None:
        token = _read_secret(consul.token_file, "identity.consul.token_file")
    return ConsulSettings(consul.address, consul.service, token=token, wait_s=consul.wait_s)


def remote_client(identity: cfg.Identity, credentials: Watch[Credentials] | None, *,
                  join_token: str | None = None) -> IssuerClient:
    """`join_token`: given by the caller (e.g. the sidecar's MESH_JOIN_TOKEN), else read from join_token_file."""
    remote = identity.remote
    assert remote is not None  # guaranteed by config validation
    bundle_path = remote.bundle or identity.ca_dir / "bundle.pem"
    try:
        bundle = bundle_path.read_bytes()
    except OSError as exc:
        raise IdentityUnavailable(f"identity.remote.bundle {bundle_path}: {exc.strerror}") from None
    token = join_token if credentials is None else None
    if token is None and credentials is None and remote.join_token_file is not None:
        token = _read_secret(remote.join_token_file, "identity.remote.join_token_file")
    return IssuerClient(remote.address, bundle_pem=bundle, bootstrap_address=remote.bootstrap_address,
                        join_token=token, credentials=credentials.get if credentials else (lambda: None),
                        server_name=remote.server_name, timeout_s=remote.timeout_s)


async def first_credentials(identity: cfg.Identity, spiffe_id: SpiffeId, ttl_s: float, *,
                            join_token: str | None = None) -> Credentials:
    """The SVID to start with, from whichever source the config names."""
    try:
        if identity.provider == "consul":
            assert identity.consul is not None
            agent = ConsulAgent(consul_settings(identity.consul))
            try:
                return await fetch_credentials(agent, spiffe_id)
            finally:
                await agent.close()
        if identity.issuer == "remote":
            client = remote_client(identity, None, join_token=join_token)
            return await obtain_credentials(client, spiffe_id, ttl_s, identity.dns)
        ca = load_ca(identity.ca_dir)
        return ca.issue_credentials(spiffe_id, ttl_s, identity.dns)
    except (CAError, IssuerError, ConsulCAError, OSError) as exc:
        raise IdentityUnavailable(f"identity ({identity.provider}/{identity.issuer}): {exc}") from None


def build_source(identity: cfg.Identity, spiffe_id: SpiffeId, credentials: Watch[Credentials], *,
                 ttl_s: float, on_result: Callable[[str], None] | None = None) -> IdentitySource:
    """`on_result("success" | "failure")` is called after every renewal attempt (the metrics counter)."""
    if identity.provider == "consul":
        assert identity.consul is not None
        return ConsulIdentity(ConsulAgent(consul_settings(identity.consul)), spiffe_id, credentials,
                              on_result=on_result)
    if identity.issuer == "remote":
        issuer: Any = remote_client(identity, credentials)
    else:
        issuer = LocalIssuer(identity.ca_dir)
    return Rotator(spiffe_id, issuer, credentials, ttl_s=ttl_s, dns=identity.dns,
                   bundle_poll_s=identity.bundle_poll_s, on_result=on_result)


def chain_expiries(credentials: Credentials) -> tuple[float, float]:
    """(not_after of the issuing intermediate, earliest not_after among the bundle's roots), epoch seconds.
    Without an intermediate in the chain the leaf's own expiry stands in."""
    chain = x509.load_pem_x509_certificates(credentials.cert_chain_pem)
    issuer = chain[1] if len(chain) > 1 else chain[0]
    roots = x509.load_pem_x509_certificates(credentials.bundle_pem)
    return (issuer.not_valid_after_utc.timestamp(), min(r.not_valid_after_utc.timestamp() for r in roots))


def _iso(epoch: float | None) -> str | None:
    return None if epoch is None else dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat(timespec="seconds")


def certs_view(status: RotationStatus, credentials: Credentials, now: float | None = None) -> dict[str, Any]:
    """The body of admin GET /certs: the current SVID, the trust bundle's roots, the issuer, rotation counters."""
    now = time.time() if now is None else now
    roots = []
    for root in x509.load_pem_x509_certificates(credentials.bundle_pem):
        expires = root.not_valid_after_utc.timestamp()
        roots.append({
            "subject": root.subject.rfc4514_string(),
            "serial": f"{root.serial_number:x}",
            "sha256": hashlib.sha256(root.public_bytes(serialization.Encoding.DER)).hexdigest(),
            "not_after": _iso(expires),
            "seconds_to_expiry": max(0, round(expires - now)),
        })
    return {
        "svid": {
            "spiffe_id": status.spiffe_id,
            "serial": f"{status.serial:x}",
            "not_before": _iso(status.not_before),
            "not_after": _iso(status.not_after),
            "seconds_to_expiry": round(status.seconds_to_expiry, 1),
            "next_refresh": _iso(status.next_refresh_at),
            "chain_length": credentials.cert_chain_pem.count(b"BEGIN CERTIFICATE"),
        },
        "bundle": roots,
        "issuer": status.issuer,
        "rotations_total": status.rotations_total,
        "failures_total": status.failures_total,
        "consecutive_failures": status.consecutive_failures,
        "last_error": status.last_error or None,
        "ready": status.ready,
    }
