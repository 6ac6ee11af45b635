"""Rotation of the gateway's own X.509 SVID: renew at half-life ±10 %, validate before use, keep the old on failure.

`next_refresh` is pure. `Rotator` is the background task: each renewal makes a fresh EC P-256 key, asks an
`Issuer` to sign it, validates the result (exactly one URI SAN equal to the configured ID, not a CA, within
validity, chains to the current bundle) and only then publishes new `Credentials` through the Watch that the edge
listener, the upstream client contexts and the gRPC credentials read. The clock is injected so tests can drive it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from mesh_gateway.identity.ca import CAError, key_pem, new_key, validate_leaf
from mesh_gateway.model import Credentials, SpiffeId
from mesh_gateway.watch import Watch

log = logging.getLogger("mesh_gateway.identity")

JITTER = 0.10


def next_refresh(not_before: float, not_after: float, rng: random.Random, *, jitter: float = JITTER) -> float:
    """When to renew (epoch seconds): half of the lifetime ±`jitter` of that half, clamped into the validity.

    The jitter spreads renewals of many workloads issued at the same moment; the clamp keeps the answer inside
    [not_before, not_after] whatever the jitter, so a renewal is never scheduled after the certificate expired.
    """
    if not 0 <= jitter < 1:
        raise ValueError("jitter must be in [0, 1)")
    lifetime = not_after - not_before
    if lifetime <= 0:
        return not_before
    half = lifetime / 2
    at = not_before + half + half * rng.uniform(-jitter, jitter)
    return min(max(at, not_before), not_after)


class Clock(Protocol):
    def time(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


@dataclass(frozen=True, slots=True)
class SignedChain:
    """What an issuer hands back: the leaf first, then intermediates; and the roots to trust. Never a key."""

    cert_chain_pem: bytes
    bundle_pem: bytes


class IssuerError(Exception):
    """The issuer refused or could not be reached; the message is safe to log."""


class Issuer(Protocol):
    name: str

    async def sign(self, key: ec.EllipticCurvePrivateKey, spiffe_id: SpiffeId, ttl_s: float,
                   dns: Sequence[str]) -> SignedChain:
        """Certify `key`'s public half. Implementations must not send the private key anywhere."""
        ...

    async def bundle(self) -> bytes:
        """The current trust bundle (cheap: cached or read only when changed)."""
        ...


@dataclass(frozen=True, slots=True)
class RotationStatus:
    """Numbers for /certs and the metrics code; read with `Rotator.status()`."""

    spiffe_id: str
    serial: int
    not_before: float
    not_after: float
    seconds_to_expiry: float
    next_refresh_at: float | None
    """None when the source decides (Consul renews leaves on its own schedule)."""
    rotations_total: int
    failures_total: int
    consecutive_failures: int
    last_error: str
    ready: bool
    issuer: str


def credentials_from_chain(spiffe_id: SpiffeId, key: ec.EllipticCurvePrivateKey, signed: SignedChain,
                           now: float) -> Credentials:
    """Parse and validate what an issuer returned; raises CAError when it must not be used."""
    try:
        chain = x509.load_pem_x509_certificates(signed.cert_chain_pem)
        roots = x509.load_pem_x509_certificates(signed.bundle_pem)
    except ValueError as exc:
        raise CAError(f"issuer returned unparsable PEM: {exc}") from None
    leaf = chain[0]
    if leaf.public_key() != key.public_key():
        raise CAError("issued certificate does not certify the key we generated")
    validate_leaf(leaf, chain[1:], roots, spiffe_id, now=dt.datetime.fromtimestamp(now, dt.UTC))
    return Credentials(
        spiffe_id=spiffe_id,
        cert_chain_pem=signed.cert_chain_pem,
        key_pem=key_pem(key),
        bundle_pem=signed.bundle_pem,
        serial=leaf.serial_number,
        not_before=leaf.not_valid_before_utc.timestamp(),
        not_after=leaf.not_valid_after_utc.timestamp(),
    )


async def obtain_credentials(issuer: Issuer, spiffe_id: SpiffeId, ttl_s: float, dns: Sequence[str] = (),
                             clock: Clock | None = None) -> Credentials:
    """One issuance: fresh EC P-256 key → sign → validate. Raises IssuerError or CAError; publishes nothing."""
    key = new_key()
    signed = await issuer.sign(key, spiffe_id, ttl_s, dns)
    return credentials_from_chain(spiffe_id, key, signed, (clock or SystemClock()).time())


class Rotator:
    """Keeps `watch` holding valid credentials for `spiffe_id`. Run `run()` under the app's supervisor."""

    def __init__(self, spiffe_id: SpiffeId, issuer: Issuer, watch: Watch[Credentials], *, ttl_s: float,
                 dns: Sequence[str] = (), clock: Clock | None = None, rng: random.Random | None = None,
                 retry_initial_s: float = 1.0, retry_max_s: float = 30.0, bundle_poll_s: float = 5.0,
                 on_result: Callable[[str], None] | None = None) -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        self.spiffe_id = spiffe_id
        self.issuer = issuer
        self.watch = watch
        self.ttl_s = ttl_s
        self.dns = tuple(dns)
        self.clock: Clock = clock or SystemClock()
        self.rng = rng or random.Random()
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.bundle_poll_s = bundle_poll_s
        self.on_result = on_result
        self._rotations = 0
        self._failures = 0
        self._consecutive = 0
        self._last_error = ""
        self._next_at = self._schedule(watch.get())

    def _schedule(self, creds: Credentials) -> float:
        # Measured from when we obtained the certificate, not from not_before: issuers backdate not_before for
        # clock skew (10 s here), which with a short TTL would put the half-life in the past and renew in a loop.
        # For credentials handed in already old, this is half of what remains, which is what we want anyway.
        return next_refresh(max(creds.not_before, self.clock.time()), creds.not_after, self.rng)

    def ready(self) -> bool:
        """False once the current certificate has expired (and renewal keeps failing)."""
        return self.clock.time() < self.watch.get().not_after

    def status(self) -> RotationStatus:
        creds = self.watch.get()
        now = self.clock.time()
        return RotationStatus(
            spiffe_id=str(creds.spiffe_id), serial=creds.serial, not_before=creds.not_before,
            not_after=creds.not_after, seconds_to_expiry=max(0.0, creds.not_after - now),
            next_refresh_at=self._next_at, rotations_total=self._rotations, failures_total=self._failures,
            consecutive_failures=self._consecutive, last_error=self._last_error, ready=self.ready(),
            issuer=self.issuer.name,
        )

    async def obtain(self) -> Credentials:
        return await obtain_credentials(self.issuer, self.spiffe_id, self.ttl_s, self.dns, self.clock)

    async def rotate_once(self) -> bool:
        """Try to renew now; on success publish, on failure keep the current credentials. True on success."""
        old = self.watch.get()
        try:
            new = await self.obtain()
        except (IssuerError, CAError, OSError, ValueError) as exc:
            self._failures += 1
            self._consecutive += 1
            self._last_error = str(exc)
            if self.on_result is not None:
                self.on_result("failure")
            expired = self.clock.time() >= old.not_after
            # Each failed attempt is logged; once expired it is an error because peers now refuse us.
            log.log(logging.ERROR if expired else logging.WARNING,
                    "identity renewal failed%s: %s", " and the current certificate has EXPIRED" if expired else "",
                    exc, extra={"event": "svid_renewal_failed", "spiffe_id": str(self.spiffe_id),
                                "issuer": self.issuer.name, "expired": expired,
                                "consecutive_failures": self._consecutive})
            return False
        self._rotations += 1
        self._consecutive = 0
        self._last_error = ""
        if self.on_result is not None:
            self.on_result("success")
        self.watch.publish(new)
        self._next_at = self._schedule(new)
        log.info("identity rotated spiffe_id=%s serial=%x not_after=%s next_refresh=%s", new.spiffe_id, new.serial,
                 _iso(new.not_after), _iso(self._next_at),
                 extra={"event": "svid_rotated", "spiffe_id": str(new.spiffe_id), "serial": f"{new.serial:x}",
                        "previous_serial": f"{old.serial:x}", "not_before": _iso(new.not_before),
                        "not_after": _iso(new.not_after), "next_refresh": _iso(self._next_at),
                        "issuer": self.issuer.name})
        return True

    async def refresh_bundle(self) -> bool:
        """Republish the current SVID with the issuer's newest bundle (root rotation). True when it changed."""
        try:
            bundle = await self.issuer.bundle()
        except (IssuerError, OSError, ValueError) as exc:
            log.warning("trust bundle refresh failed: %s", exc, extra={"event": "bundle_refresh_failed"})
            return False
        current = self.watch.get()
        if not bundle or bundle == current.bundle_pem:
            return False
        try:
            roots = x509.load_pem_x509_certificates(bundle)
        except ValueError:
            log.warning("issuer returned an unparsable trust bundle; keeping the current one")
            return False
        updated = Credentials(current.spiffe_id, current.cert_chain_pem, current.key_pem, bundle, current.serial,
                              current.not_before, current.not_after)
        self.watch.publish(updated)
        log.info("trust bundle updated: %d roots", len(roots), extra={"event": "bundle_updated", "roots": len(roots)})
        return True

    async def run(self) -> None:
        """Forever: sleep until the refresh time (waking to follow the bundle), renew, back off on failure."""
        backoff = self.retry_initial_s
        while True:
            now = self.clock.time()
            if now < self._next_at:
                await self.clock.sleep(min(self._next_at - now, self.bundle_poll_s))
                await self.refresh_bundle()
                continue
            if await self.rotate_once():
                backoff = self.retry_initial_s
                continue
            # Full jitter keeps a fleet from retrying in lockstep against a recovering issuer.
            await self.clock.sleep(backoff * (0.5 + self.rng.random() / 2))
            backoff = min(backoff * 2, self.retry_max_s)


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat(timespec="seconds")
