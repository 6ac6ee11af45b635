"""Rotating the CA itself: a new intermediate, a new cross-signed root, pruning retired roots, automatic renewal.

Root rotation is a key rollover in the RFC 4210 style: the new root keeps the old root's subject name, and
`cross.pem` is the new root's key certified by the old root. Because that cross certificate is self-issued (subject
== issuer) it does not count against the old root's path length, so peers that still trust only the old root
verify `leaf → intermediate → cross → old root`, while peers with the new bundle stop at the new root. The old root
stays in bundle.pem until `prune_after` (2x the longest leaf TTL after the rotation), when every leaf it vouched for
has expired; `prune_roots` then drops it and the cross certificate.

Intermediate renewal follows SPIRE: a successor is prepared once half of the intermediate's life has passed and
activated when less than 1/6 remains. Every write is atomic (identity/files.py) and keys are 0600.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mesh_gateway.identity.ca import (
    INTERMEDIATE_LIFETIME,
    ROOT_LIFETIME,
    CAError,
    CertificateAuthority,
    _ca_cert,
    cert_pem,
    key_pem,
    load_ca,
    make_intermediate,
    new_key,
    trust_domain_of,
)
from mesh_gateway.identity.files import write_atomic

RETIRED_FILE = "retired-roots.json"
NEXT_CERT, NEXT_KEY = "next-intermediate.pem", "next-intermediate.key"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@contextlib.contextmanager
def ca_lock(directory: Path) -> Iterator[None]:
    """Serialise writers of one CA directory across processes (`ca serve`, gateways, the CLI): two processes
    preparing an intermediate at once could otherwise pair one's key with the other's certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / ".ca.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _load_root(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        root = x509.load_pem_x509_certificate((directory / "root.pem").read_bytes())
        key = serialization.load_pem_private_key((directory / "root.key").read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise CAError(f"{directory}: cannot load the root (root.pem/root.key): {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != root.public_key():
        raise CAError(f"{directory}: root.key does not match root.pem")
    return root, key


def _install_intermediate(directory: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    # Key first: a reader that sees the new key with the old certificate fails validation and retries, while
    # the other order could pair a new certificate with a key that no longer exists.
    write_atomic(directory / "intermediate.key", key_pem(key), private=True)
    write_atomic(directory / "intermediate.pem", cert_pem(cert))


def rotate_intermediate(directory: Path, now: dt.datetime | None = None) -> CertificateAuthority:
    """A new intermediate signed by the current root; issuing switches to it. The bundle is unchanged."""
    with ca_lock(directory):
        return _rotate_intermediate(directory, now)


def _rotate_intermediate(directory: Path, now: dt.datetime | None) -> CertificateAuthority:
    root, root_key = _load_root(directory)
    cert, key = make_intermediate(root, root_key, trust_domain_of(root), now=now or _now())
    _install_intermediate(directory, cert, key)
    (directory / NEXT_CERT).unlink(missing_ok=True)
    (directory / NEXT_KEY).unlink(missing_ok=True)
    return load_ca(directory)


@dataclass(frozen=True, slots=True)
class RetiredRoot:
    fingerprint: str
    prune_after: dt.datetime


def read_retired(directory: Path) -> list[RetiredRoot]:
    path = directory / RETIRED_FILE
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
        return [RetiredRoot(item["fingerprint"], dt.datetime.fromisoformat(item["prune_after"])) for item in data]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CAError(f"{path}: unreadable: {exc}") from None


def _write_retired(directory: Path, retired: list[RetiredRoot]) -> None:
    data = [{"fingerprint": r.fingerprint, "prune_after": r.prune_after.isoformat()} for r in retired]
    write_atomic(directory / RETIRED_FILE, json.dumps(data, indent=2).encode())


def rotate_root(directory: Path, max_leaf_ttl_s: float, now: dt.datetime | None = None) -> CertificateAuthority:
    """A new root (same subject, new key) cross-signed by the old one, a new intermediate under it, and a bundle
    holding both roots. The old root is retired: pruned by `prune_roots` after 2x `max_leaf_ttl_s`."""
    if max_leaf_ttl_s <= 0:
        raise CAError("max leaf TTL must be positive")
    with ca_lock(directory):
        return _rotate_root(directory, max_leaf_ttl_s, now or _now())


def _rotate_root(directory: Path, max_leaf_ttl_s: float, now: dt.datetime) -> CertificateAuthority:
    old_root, old_key = _load_root(directory)
    domain = trust_domain_of(old_root)
    key = new_key()
    new_root = _ca_cert(old_root.subject, old_root.subject, key.public_key(), key, key.public_key(),
                        trust_domain=domain, lifetime=ROOT_LIFETIME, path_length=1, constrain=False, now=now)
    cross = _ca_cert(old_root.subject, old_root.subject, key.public_key(), old_key, old_key.public_key(),
                     trust_domain=domain, lifetime=ROOT_LIFETIME, path_length=1, constrain=False,
                     not_after_cap=old_root.not_valid_after_utc, now=now)
    intermediate, intermediate_key = make_intermediate(new_root, key, domain, now=now)
    bundle = x509.load_pem_x509_certificates((directory / "bundle.pem").read_bytes())
    retired = read_retired(directory)
    retired.append(RetiredRoot(fingerprint(old_root), now + dt.timedelta(seconds=2 * max_leaf_ttl_s)))
    # Order matters for readers: trust first (bundle with both roots), then the new issuing material.
    write_atomic(directory / "bundle.pem", b"".join(cert_pem(c) for c in [*bundle, new_root]))
    _write_retired(directory, retired)
    write_atomic(directory / "cross.pem", cert_pem(cross))
    write_atomic(directory / "root.key", key_pem(key), private=True)
    write_atomic(directory / "root.pem", cert_pem(new_root))
    _install_intermediate(directory, intermediate, intermediate_key)
    (directory / NEXT_CERT).unlink(missing_ok=True)
    (directory / NEXT_KEY).unlink(missing_ok=True)
    return load_ca(directory)


def prune_roots(directory: Path, now: dt.datetime | None = None) -> list[str]:
    """Drop retired roots whose overlap is over (and the cross certificate they signed). Returns fingerprints."""
    with ca_lock(directory):
        return _prune_roots(directory, now or _now())


def _prune_roots(directory: Path, now: dt.datetime) -> list[str]:
    retired = read_retired(directory)
    due = {r.fingerprint for r in retired if r.prune_after <= now}
    if not due:
        return []
    bundle = x509.load_pem_x509_certificates((directory / "bundle.pem").read_bytes())
    keep = [c for c in bundle if fingerprint(c) not in due]
    if not keep:
        raise CAError("pruning would leave an empty trust bundle")
    write_atomic(directory / "bundle.pem", b"".join(cert_pem(c) for c in keep))
    cross_path = directory / "cross.pem"
    if cross_path.exists():
        cross = x509.load_pem_x509_certificates(cross_path.read_bytes())
        # A cross certificate only helps peers that trust its issuer; once that root is gone, it is noise.
        still = [c for c in cross if any(_signed_by(c, root) for root in keep)]
        if still:
            write_atomic(cross_path, b"".join(cert_pem(c) for c in still))
        else:
            cross_path.unlink()
    _write_retired(directory, [r for r in retired if r.fingerprint not in due])
    return sorted(due)


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


@dataclass(frozen=True, slots=True)
class Maintenance:
    prepared: bool = False
    activated: bool = False
    pruned: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return self.prepared or self.activated or bool(self.pruned)


def maintain(directory: Path, now: dt.datetime | None = None,
             intermediate_lifetime: dt.timedelta = INTERMEDIATE_LIFETIME) -> Maintenance:
    """The periodic CA chore: prepare the next intermediate at 1/2 life, activate it at 1/6 remaining, prune."""
    with ca_lock(directory):
        return _maintain(directory, now or _now(), intermediate_lifetime)


def _maintain(directory: Path, now: dt.datetime, intermediate_lifetime: dt.timedelta) -> Maintenance:
    ca = load_ca(directory)
    current = ca.intermediate
    life = current.not_valid_after_utc - current.not_valid_before_utc
    remaining = current.not_valid_after_utc - now
    prepared = activated = False
    if remaining < life / 2 and not (directory / NEXT_CERT).exists():
        root, root_key = _load_root(directory)
        cert, key = make_intermediate(root, root_key, ca.trust_domain, lifetime=intermediate_lifetime, now=now)
        write_atomic(directory / NEXT_KEY, key_pem(key), private=True)
        write_atomic(directory / NEXT_CERT, cert_pem(cert))
        prepared = True
    if remaining < life / 6:
        pair = _read_prepared(directory)
        if pair is None:
            # A damaged prepared pair must not block renewal forever: make a fresh successor instead.
            root, root_key = _load_root(directory)
            pair = make_intermediate(root, root_key, ca.trust_domain, lifetime=intermediate_lifetime, now=now)
        _install_intermediate(directory, *pair)
        (directory / NEXT_CERT).unlink(missing_ok=True)
        (directory / NEXT_KEY).unlink(missing_ok=True)
        activated = True
    return Maintenance(prepared, activated, tuple(_prune_roots(directory, now)))


def _read_prepared(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    try:
        cert = x509.load_pem_x509_certificate((directory / NEXT_CERT).read_bytes())
        key = serialization.load_pem_private_key((directory / NEXT_KEY).read_bytes(), password=None)
    except (OSError, ValueError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        return None
    return cert, key
