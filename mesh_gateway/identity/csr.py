"""What the issuance API will sign: a CSR checked against the CA's policy before any key touches it.

Refusals are GatewayErrors whose public message tells the caller exactly what to fix:
  BadRequest (INVALID_ARGUMENT)   unparsable CSR, bad CSR signature, weak or unsupported key, SANs other than one
                                  spiffe:// URI plus allowed DNS names / IPs, TTL over the maximum
  Forbidden (PERMISSION_DENIED)   SPIFFE ID outside the trust domain, or not the identity the caller may obtain
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from mesh_gateway.errors import BadRequest, Forbidden
from mesh_gateway.model import SpiffeId

MAX_CSR_BYTES = 16 * 1024
MIN_RSA_BITS = 2048
ALLOWED_CURVES = ("secp256r1", "secp384r1")


@dataclass(frozen=True, slots=True)
class CsrPolicy:
    trust_domain: str
    max_ttl_s: float
    default_ttl_s: float
    allowed_dns: tuple[str, ...] = ()
    """Shell-style patterns (`localhost`, `*.svc.example.org`, `127.0.0.1`); DNS/IP SANs matching none are refused."""


@dataclass(frozen=True, slots=True)
class CheckedCsr:
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey
    spiffe_id: SpiffeId
    dns: tuple[str, ...]
    ttl_s: float


def _bad(message: str) -> BadRequest:
    return BadRequest(message, public_message=message)


def _denied(message: str) -> Forbidden:
    return Forbidden(message, public_message=message)


def check_csr(csr_pem: str | bytes, ttl_s: float, policy: CsrPolicy) -> CheckedCsr:
    """Parse and police a CSR. Does not decide *who* may ask for the ID: the caller compares `spiffe_id`."""
    data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
    if len(data) > MAX_CSR_BYTES:
        raise _bad(f"CSR larger than {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError:
        raise _bad("csr_pem is not a PEM-encoded PKCS#10 certificate signing request") from None
    if not csr.is_signature_valid:
        raise _bad("CSR signature does not verify (proof of key possession failed)")
    public_key = csr.public_key()
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise _bad(f"RSA key of {public_key.key_size} bits is too weak (minimum {MIN_RSA_BITS})")
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name not in ALLOWED_CURVES:
            raise _bad(f"EC curve {public_key.curve.name} is not allowed (use P-256 or P-384)")
    else:
        raise _bad(f"unsupported key type {type(public_key).__name__} (use EC P-256/P-384 or RSA >= 2048)")
    spiffe_id, dns = _sans(csr, policy)
    if ttl_s < 0:
        raise _bad("ttl_s must not be negative")
    ttl = float(ttl_s) if ttl_s else policy.default_ttl_s
    if ttl > policy.max_ttl_s:
        raise _bad(f"requested TTL {ttl:.0f}s exceeds the maximum of {policy.max_ttl_s:.0f}s")
    return CheckedCsr(public_key, spiffe_id, dns, ttl)


def _sans(csr: x509.CertificateSigningRequest, policy: CsrPolicy) -> tuple[SpiffeId, tuple[str, ...]]:
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise _bad("CSR has no subjectAltName; it must carry exactly one spiffe:// URI SAN") from None
    except ValueError:
        raise _bad("CSR extensions are malformed") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise _bad(f"CSR must carry exactly one URI SAN (the SPIFFE ID), found {len(uris)}")
    try:
        spiffe_id = SpiffeId.parse(uris[0])
    except ValueError as exc:
        raise _bad(f"CSR URI SAN is not a valid SPIFFE ID: {exc}") from None
    if not spiffe_id.member_of(policy.trust_domain):
        raise _denied(f"SPIFFE ID {spiffe_id} is outside trust domain {policy.trust_domain}")
    if not spiffe_id.path:
        raise _bad("a workload SPIFFE ID needs a path (spiffe://domain/path)")
    dns = (*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress)))
    others = [name for name in san
              if not isinstance(name, x509.UniformResourceIdentifier | x509.DNSName | x509.IPAddress)]
    if others:
        kinds = sorted({type(name).__name__ for name in others})
        raise _bad(f"CSR carries SANs of kinds {', '.join(kinds)}; only one URI and allowed DNS names are signed")
    for name in dns:
        if not any(fnmatch.fnmatchcase(name.lower(), pattern.lower()) for pattern in policy.allowed_dns):
            raise _bad(f"DNS/IP SAN {name!r} is not allowed by this CA")
    return spiffe_id, dns
