"""next_refresh table tests and the Rotator driven by an injected clock against a real CA."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import logging
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from mesh_gateway.identity.ca import CertificateAuthority, cert_pem, init_ca
from mesh_gateway.identity.rotation import IssuerError, Rotator, SignedChain, next_refresh
from mesh_gateway.model import Credentials, SpiffeId
from mesh_gateway.watch import Watch

GW = SpiffeId("example.org", "/gateway")


@pytest.mark.parametrize(
    ("not_before", "not_after", "low", "high"),
    [
        (0.0, 3600.0, 1620.0, 1980.0),  # 1 h: 30 min ± 3 min
        (1000.0, 1060.0, 1027.0, 1033.0),  # 1 min TTL
        (5.0, 10.0, 7.25, 7.75),  # 5 s TTL used by the load test
    ],
)
def test_next_refresh_within_half_life_jitter(not_before: float, not_after: float, low: float, high: float) -> None:
    rng = random.Random(7)
    values = [next_refresh(not_before, not_after, rng) for _ in range(2000)]
    assert low <= min(values) and max(values) <= high
    # the jitter actually spreads renewals: both halves of the window are used
    mid = (low + high) / 2
    assert any(v < mid - (high - low) / 4 for v in values) and any(v > mid + (high - low) / 4 for v in values)


def test_next_refresh_seeded_is_reproducible() -> None:
    assert next_refresh(0, 100, random.Random(1)) == next_refresh(0, 100, random.Random(1))


@pytest.mark.parametrize(
    ("not_before", "not_after", "jitter", "expected"),
    [
        (100.0, 100.0, 0.1, 100.0),  # empty validity: renew at once
        (100.0, 50.0, 0.1, 100.0),  # inverted: clamped, never "after expiry"
        (0.0, 100.0, 0.0, 50.0),  # no jitter: exactly half-life
    ],
)
def test_next_refresh_clamps(not_before: float, not_after: float, jitter: float, expected: float) -> None:
    assert next_refresh(not_before, not_after, random.Random(3), jitter=jitter) == expected


def test_next_refresh_extreme_jitter_stays_inside_validity() -> None:
    rng = random.Random(11)
    for _ in range(500):
        assert 0.0 <= next_refresh(0.0, 10.0, rng, jitter=0.999) <= 10.0
    with pytest.raises(ValueError):
        next_refresh(0, 10, rng, jitter=1.5)


class FakeClock:
    """Time moves only when the rotator sleeps; sleeping yields to the loop so tests can observe."""

    def __init__(self, start: float) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


class ClockedIssuer:
    """A real CA that signs at the fake clock's time; can be switched to refuse."""

    name = "test-ca"

    def __init__(self, ca: CertificateAuthority, clock: FakeClock) -> None:
        self.ca = ca
        self.clock = clock
        self.failing = False
        self.wrong_id: SpiffeId | None = None
        self.signed = 0

    async def sign(self, key: ec.EllipticCurvePrivateKey, spiffe_id: SpiffeId, ttl_s: float,
                   dns: Sequence[str]) -> SignedChain:
        if self.failing:
            raise IssuerError("issuer unavailable")
        now = dt.datetime.fromtimestamp(self.clock.now, dt.UTC)
        leaf = self.ca.issue(key.public_key(), self.wrong_id or spiffe_id, ttl_s, dns, now=now)
        self.signed += 1
        return SignedChain(cert_pem(leaf) + cert_pem(self.ca.intermediate), self.ca.bundle_pem)

    async def bundle(self) -> bytes:
        return self.ca.bundle_pem


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return init_ca(tmp_path / "ca", "example.org")


Started = tuple[FakeClock, ClockedIssuer, Watch[Credentials], Rotator]


def start(ca: CertificateAuthority, ttl_s: float = 60.0) -> Started:
    clock = FakeClock(dt.datetime.now(dt.UTC).timestamp())
    issuer = ClockedIssuer(ca, clock)
    first = ca.issue_credentials(GW, ttl_s, now=dt.datetime.fromtimestamp(clock.now, dt.UTC))
    watch: Watch[Credentials] = Watch(first)
    rotator = Rotator(GW, issuer, watch, ttl_s=ttl_s, clock=clock, rng=random.Random(5), bundle_poll_s=1000)
    return clock, issuer, watch, rotator


async def run_until(rotator: Rotator, condition: object, limit: int = 10000) -> None:
    task = asyncio.create_task(rotator.run())
    try:
        for _ in range(limit):
            if condition():  # type: ignore[operator]
                return
            await asyncio.sleep(0)
        raise AssertionError("condition not reached")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_rotator_renews_at_half_life_with_new_keys(ca: CertificateAuthority) -> None:
    _clock, _issuer, watch, rotator = start(ca)
    first = watch.get()
    seen: list[Credentials] = []

    def five() -> bool:
        if watch.get() not in seen:
            seen.append(watch.get())
        return len(seen) >= 5

    await run_until(rotator, five)
    assert len({c.serial for c in seen}) == 5
    assert len({c.key_pem for c in seen}) == 5  # a fresh key every renewal
    for previous, current in itertools.pairwise(seen):
        issued = previous.not_before + 10  # the CA backdates not_before by 10 s for clock skew
        lifetime = previous.not_after - issued
        # renewed between 45 % and 55 % of the previous certificate's life (from issuance), never after expiry
        assert issued + 0.45 * lifetime <= current.not_before + 10 <= issued + 0.55 * lifetime
    leaf = x509.load_pem_x509_certificate(seen[-1].cert_chain_pem)
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    assert seen[0] == first
    status = rotator.status()
    assert status.rotations_total == 4 and status.ready and status.serial == seen[-1].serial


async def test_rotator_keeps_old_cert_on_failure_then_recovers_with_backoff(
    ca: CertificateAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    clock, issuer, watch, rotator = start(ca)
    first = watch.get()
    issuer.failing = True
    caplog.set_level(logging.WARNING, "mesh_gateway.identity")
    await run_until(rotator, lambda: rotator.status().failures_total >= 4)
    assert watch.get() == first  # nothing published while failing
    assert rotator.ready()  # not yet expired
    assert rotator.status().last_error == "issuer unavailable"
    retry_sleeps = clock.sleeps[-3:]
    assert retry_sleeps[0] < retry_sleeps[2]  # backoff grows
    assert all("renewal failed" in r.message for r in caplog.records if r.name == "mesh_gateway.identity")
    issuer.failing = False
    await run_until(rotator, lambda: watch.get() != first)
    assert rotator.status().consecutive_failures == 0


async def test_rotator_expired_cert_makes_not_ready_and_logs_error_each_attempt(
    ca: CertificateAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    clock, issuer, watch, rotator = start(ca)
    issuer.failing = True
    caplog.set_level(logging.WARNING, "mesh_gateway.identity")
    await run_until(rotator, lambda: clock.now > watch.get().not_after + 120)
    assert not rotator.ready()
    assert not rotator.status().ready
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "EXPIRED" in r.message]
    assert len(errors) >= 2


async def test_rotator_refuses_cert_for_another_identity(ca: CertificateAuthority) -> None:
    _clock, issuer, watch, rotator = start(ca)
    first = watch.get()
    issuer.wrong_id = SpiffeId("example.org", "/intruder")
    assert await rotator.rotate_once() is False
    assert watch.get() == first
    assert "expected exactly [spiffe://example.org/gateway]" in rotator.status().last_error


async def test_rotator_refuses_cert_not_chaining_to_bundle(ca: CertificateAuthority, tmp_path: Path) -> None:
    _clock, issuer, _watch, rotator = start(ca)
    other = init_ca(tmp_path / "other", "example.org")
    issuer.ca = CertificateAuthority(other.trust_domain, other.intermediate, other.intermediate_key, ca.roots)
    assert await rotator.rotate_once() is False
    assert "does not chain" in rotator.status().last_error


async def test_short_ttl_with_backdated_not_before_does_not_renew_in_a_loop(ca: CertificateAuthority) -> None:
    # The CA backdates not_before by 10 s; with a 5 s TTL a schedule from not_before would already be due.
    clock, issuer, _watch, rotator = start(ca, ttl_s=5.0)
    began = clock.now
    await run_until(rotator, lambda: issuer.signed >= 4)
    # four renewals at ~2.5 s each (±10 %): at least 4 x 2.25 s of (fake) time went by
    assert clock.now - began >= 9.0
    assert rotator.status().rotations_total == 4
