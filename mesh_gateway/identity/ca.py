"""The internal CA: a root, a name-constrained intermediate, and leaf issuance as template → sign → validate.

Layout of a CA directory:
  root.pem / root.key                 self-signed root (EC P-256, 10 years)
  intermediate.pem / intermediate.key issuing CA (1 year, path length 0, URI names limited to the trust domain)
  bundle.pem                          the trust bundle (roots) peers verify against
  cross.pem                           (after `ca rotate --root`) the new root cross-signed by the old one, sent
                                      after the intermediate so peers that only know the old root still verify
Keys are written 0600. Rotation and pruning live in identity/ca_rotation.py.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh_gateway.identity.files import write_atomic
from mesh_gateway.model import Credentials, SpiffeId

ROOT_LIFETIME = dt.timedelta(days=3650)
INTERMEDIATE_LIFETIME = dt.timedelta(days=365)
BACKDATE = dt.timedelta(seconds=10)
CA_FILES = ("root.pem", "root.key", "intermediate.pem", "intermediate.key", "bundle.pem")


class CAError(Exception):
    """Bad input or a CA directory that cannot be used; the message is one line for a human."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _ca_cert(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
             signer: ec.EllipticCurvePrivateKey, issuer_public: ec.EllipticCurvePublicKey, *,
             trust_domain: str, lifetime: dt.timedelta, path_length: int | None, constrain: bool,
             not_after_cap: dt.datetime | None = None, now: dt.datetime | None = None) -> x509.Certificate:
    now = now or _now()
    not_after = now + lifetime
    if not_after_cap is not None:
        not_after = min(not_after, not_after_cap)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public), critical=False)
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]), critical=False)
    )
    if constrain:
        # URI constraint only (plus no IP constraint): grpcio refuses chains with IP name constraints, and
        # DNS SANs on leaves (e.g. localhost) stay usable. Python's ssl (OpenSSL) enforces URI constraints.
        builder = builder.add_extension(
            x509.NameConstraints(permitted_subtrees=[x509.UniformResourceIdentifier(trust_domain)],
                                 excluded_subtrees=None), critical=True)
    return builder.sign(signer, hashes.SHA256())


def _name(common_name: str, trust_domain: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_root(trust_domain: str, now: dt.datetime | None = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = new_key()
    name = _name(f"mesh-gateway root {secrets.token_hex(4)}", trust_domain)
    cert = _ca_cert(name, name, key.public_key(), key, key.public_key(), trust_domain=trust_domain,
                    lifetime=ROOT_LIFETIME, path_length=1, constrain=False, now=now)
    return cert, key


def make_intermediate(root: x509.Certificate, root_key: ec.EllipticCurvePrivateKey, trust_domain: str,
                      lifetime: dt.timedelta = INTERMEDIATE_LIFETIME, now: dt.datetime | None = None,
                      ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = new_key()
    name = _name(f"mesh-gateway intermediate {secrets.token_hex(4)}", trust_domain)
    cert = _ca_cert(name, root.subject, key.public_key(), root_key, root_key.public_key(),
                    trust_domain=trust_domain, lifetime=lifetime, path_length=0, constrain=True,
                    not_after_cap=root.not_valid_after_utc, now=now)
    return cert, key


def trust_domain_of(cert: x509.Certificate) -> str:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CAError("CA certificate has no spiffe:// trust-domain URI SAN") from None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith("spiffe://"):
            return uri[len("spiffe://"):].rstrip("/")
    raise CAError("CA certificate has no spiffe:// trust-domain URI SAN")


@dataclass(frozen=True)
class CertificateAuthority:
    """A loaded CA directory: the key that issues and the roots peers trust."""

    trust_domain: str
    intermediate: x509.Certificate
    intermediate_key: ec.EllipticCurvePrivateKey = field(repr=False)
    roots: tuple[x509.Certificate, ...]
    directory: Path | None = None
    cross: tuple[x509.Certificate, ...] = ()

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """What follows a leaf on the wire: the intermediate, then any cross-signed root."""
        return (self.intermediate, *self.cross)

    @property
    def bundle_pem(self) -> bytes:
        return b"".join(cert_pem(root) for root in self.roots)

    @property
    def max_not_after(self) -> dt.datetime:
        return self.intermediate.not_valid_after_utc

    def issue(self, public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey, spiffe_id: SpiffeId,
              ttl_s: float, dns: Sequence[str] = (), now: dt.datetime | None = None) -> x509.Certificate:
        """Template → sign → validate. Raises CAError on bad input; never returns an unvalidated leaf."""
        now = now or _now()
        if not spiffe_id.member_of(self.trust_domain):
            raise CAError(f"SPIFFE ID {spiffe_id} is not in trust domain {self.trust_domain}")
        if not spiffe_id.path:
            raise CAError("a workload SPIFFE ID needs a path (spiffe://domain/path)")
        if ttl_s <= 0:
            raise CAError("TTL must be positive")
        not_after = now + dt.timedelta(seconds=ttl_s)
        if not_after > self.max_not_after:
            raise CAError(f"TTL of {ttl_s:.0f}s goes past the intermediate's expiry "
                          f"({self.max_not_after.isoformat()})")
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
        for name in dns:
            if not name or any(c in name for c in " /:@"):
                raise CAError(f"invalid DNS name {name!r}")
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                names.append(x509.DNSName(name))
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.trust_domain)]))
            .issuer_name(self.intermediate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.intermediate_key.public_key()), critical=False)
            .sign(self.intermediate_key, hashes.SHA256())
        )
        validate_leaf(leaf, self.chain, self.roots, spiffe_id, now=now)
        return leaf

    def issue_credentials(self, spiffe_id: SpiffeId, ttl_s: float, dns: Sequence[str] = (),
                          now: dt.datetime | None = None) -> Credentials:
        key = new_key()
        leaf = self.issue(key.public_key(), spiffe_id, ttl_s, dns, now=now)
        return Credentials(
            spiffe_id=spiffe_id,
            cert_chain_pem=cert_pem(leaf) + b"".join(cert_pem(c) for c in self.chain),
            key_pem=key_pem(key),
            bundle_pem=self.bundle_pem,
            serial=leaf.serial_number,
            not_before=leaf.not_valid_before_utc.timestamp(),
            not_after=leaf.not_valid_after_utc.timestamp(),
        )


def validate_leaf(leaf: x509.Certificate, intermediates: Sequence[x509.Certificate],
                  roots: Sequence[x509.Certificate], expected: SpiffeId, now: dt.datetime | None = None) -> None:
    """Chain to the roots, exactly one URI SAN equal to `expected`, not a CA, within validity.

    cryptography's path builder refuses URI name constraints ("unsupported name constraint"), so the chain is
    walked here: each signature checked against its issuer, every certificate within validity, issuers are CAs,
    and the trust domain (what the URI constraint says) checked explicitly.
    """
    now = now or _now()
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CAError("certificate has no subjectAltName") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if uris != [str(expected)]:
        raise CAError(f"certificate carries URI SANs {uris}, expected exactly [{expected}]")
    if _is_ca(leaf):
        raise CAError("certificate is a CA")
    chain = [leaf]
    pool = list(intermediates)
    while True:
        current = chain[-1]
        if not current.not_valid_before_utc <= now <= current.not_valid_after_utc:
            raise CAError(f"certificate {current.subject.rfc4514_string() or 'leaf'} is outside its validity period")
        root = next((r for r in roots if _issued_by(current, r)), None)
        if root is not None:
            if not root.not_valid_before_utc <= now <= root.not_valid_after_utc:
                raise CAError("trust bundle root is outside its validity period")
            break
        issuer = next((c for c in pool if c not in chain and _is_ca(c) and _issued_by(current, c)), None)
        if issuer is None or len(chain) > 3:
            raise CAError("certificate does not chain to the trust bundle")
        domain = trust_domain_of(issuer)
        if domain != expected.trust_domain:
            raise CAError(f"issuer belongs to trust domain {domain}, not {expected.trust_domain}")
        chain.append(issuer)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _read_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _read_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CAError(f"{path}: expected an EC private key")
    return key


def init_ca(directory: Path, trust_domain: str, *, force: bool = False) -> CertificateAuthority:
    SpiffeId(trust_domain, "")  # validates the trust domain name
    existing = [name for name in CA_FILES if (directory / name).exists()]
    if existing and not force:
        raise CAError(f"{directory} already holds a CA ({', '.join(existing)}); use --force to replace it")
    root, root_key = make_root(trust_domain)
    intermediate, intermediate_key = make_intermediate(root, root_key, trust_domain)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(directory / "root.key", key_pem(root_key), private=True)
    write_atomic(directory / "intermediate.key", key_pem(intermediate_key), private=True)
    write_atomic(directory / "root.pem", cert_pem(root))
    write_atomic(directory / "intermediate.pem", cert_pem(intermediate))
    write_atomic(directory / "bundle.pem", cert_pem(root))
    return CertificateAuthority(trust_domain, intermediate, intermediate_key, (root,), directory)


def load_ca(directory: Path) -> CertificateAuthority:
    missing = [name for name in ("intermediate.pem", "intermediate.key", "bundle.pem")
               if not (directory / name).exists()]
    if missing:
        raise CAError(f"{directory} is not a CA directory (missing {', '.join(missing)}); "
                      f"run 'mesh-gateway ca init --dir {directory}'")
    try:
        intermediate = _read_cert(directory / "intermediate.pem")
        key = _read_key(directory / "intermediate.key")
        roots = tuple(x509.load_pem_x509_certificates((directory / "bundle.pem").read_bytes()))
        cross_path = directory / "cross.pem"
        cross = tuple(x509.load_pem_x509_certificates(cross_path.read_bytes())) if cross_path.exists() else ()
    except (ValueError, OSError) as exc:
        raise CAError(f"{directory}: cannot load CA: {exc}") from None
    return CertificateAuthority(trust_domain_of(intermediate), intermediate, key, roots, directory, cross)
