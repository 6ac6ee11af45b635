"""The CSR issuance API over real gRPC with real TLS from our CA: bootstrap, renewal, refusals, bundles."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from mesh_gateway.identity.ca import CertificateAuthority, init_ca
from mesh_gateway.identity.ca_rotation import rotate_root
from mesh_gateway.identity.issuer_api import (
    IssuerClient,
    IssuerRpcError,
    IssuerServer,
    IssuerSettings,
    build_csr,
)
from mesh_gateway.identity.join_tokens import JoinTokenStore
from mesh_gateway.identity.local_issuer import LocalIssuer
from mesh_gateway.identity.rotation import Rotator, SignedChain, credentials_from_chain, obtain_credentials
from mesh_gateway.model import Credentials, SpiffeId
from mesh_gateway.watch import Watch

WEB = SpiffeId("example.org", "/web")
API = SpiffeId("example.org", "/api")


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def issuer(tmp_path: Path) -> AsyncIterator[tuple[IssuerServer, CertificateAuthority, Clock]]:
    ca = init_ca(tmp_path / "ca", "example.org")
    clock = Clock()
    settings = IssuerSettings(address="127.0.0.1:0", bootstrap_address="127.0.0.1:0", max_ttl_s=7200,
                              allowed_dns=("localhost",), sign_per_minute=60, sign_burst=8, bundle_poll_s=0.05)
    server = IssuerServer(LocalIssuer(tmp_path / "ca"), settings, JoinTokenStore(tmp_path / "ca", clock))
    await server.start()
    yield server, ca, clock
    await server.stop(0)


def client_for(server: IssuerServer, ca: CertificateAuthority, creds: Credentials | None = None) -> IssuerClient:
    return IssuerClient(f"127.0.0.1:{server.port}", bootstrap_address=f"127.0.0.1:{server.bootstrap_port}",
                        bundle_pem=ca.bundle_pem, credentials=lambda: creds, server_name="localhost")


def assert_no_private_key(signed: SignedChain) -> None:
    assert b"PRIVATE KEY" not in signed.cert_chain_pem and b"PRIVATE KEY" not in signed.bundle_pem


async def bootstrap(server: IssuerServer, ca: CertificateAuthority, spiffe_id: SpiffeId) -> Credentials:
    token = server.tokens.create(spiffe_id, 900)
    key = ec.generate_private_key(ec.SECP256R1())
    signed = await client_for(server, ca).sign_csr(build_csr(key, spiffe_id), 600, join_token=token)
    assert_no_private_key(signed)
    return credentials_from_chain(spiffe_id, key, signed, time.time())


async def test_join_token_bootstraps_once(issuer: tuple[IssuerServer, CertificateAuthority, Clock]) -> None:
    server, ca, _ = issuer
    token = server.tokens.create(WEB, 900)
    assert token not in (Path(ca.directory or ".") / "join-tokens.json").read_text()  # stored hashed
    key = ec.generate_private_key(ec.SECP256R1())
    client = client_for(server, ca)
    signed = await client.sign_csr(build_csr(key, WEB, ["localhost"]), 600, join_token=token)
    assert_no_private_key(signed)
    creds = credentials_from_chain(WEB, key, signed, time.time())
    assert 590 <= creds.not_after - time.time() <= 601
    leaf = x509.load_pem_x509_certificate(signed.cert_chain_pem)
    assert leaf.public_key() == key.public_key()  # the server certified our key; it never made one
    with pytest.raises(IssuerRpcError) as reuse:
        await client.sign_csr(build_csr(key, WEB), 600, join_token=token)
    assert reuse.value.code == "UNAUTHENTICATED" and "already used" in reuse.value.details


async def test_unknown_and_expired_tokens_refused(issuer: tuple[IssuerServer, CertificateAuthority, Clock]) -> None:
    server, ca, clock = issuer
    client = client_for(server, ca)
    csr = build_csr(ec.generate_private_key(ec.SECP256R1()), WEB)
    with pytest.raises(IssuerRpcError) as unknown:
        await client.sign_csr(csr, 600, join_token="not-a-real-token")
    assert unknown.value.code == "UNAUTHENTICATED"
    token = server.tokens.create(WEB, 60)
    clock.now += 61
    with pytest.raises(IssuerRpcError) as expired:
        await client.sign_csr(csr, 600, join_token=token)
    assert expired.value.code == "UNAUTHENTICATED"


async def test_token_binds_identity_and_is_not_burned_by_a_refused_csr(
    issuer: tuple[IssuerServer, CertificateAuthority, Clock],
) -> None:
    server, ca, _ = issuer
    token = server.tokens.create(WEB, 900)
    client = client_for(server, ca)
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(IssuerRpcError) as other:
        await client.sign_csr(build_csr(key, API), 600, join_token=token)
    assert other.value.code == "PERMISSION_DENIED" and "may obtain only spiffe://example.org/web" in other.value.details
    signed = await client.sign_csr(build_csr(key, WEB), 600, join_token=token)  # still usable
    credentials_from_chain(WEB, key, signed, time.time())


async def test_renewal_over_mtls_own_id_only(issuer: tuple[IssuerServer, CertificateAuthority, Clock]) -> None:
    server, ca, _ = issuer
    creds = await bootstrap(server, ca, WEB)
    client = client_for(server, ca, creds)
    key = ec.generate_private_key(ec.SECP256R1())
    renewed = credentials_from_chain(WEB, key, await client.sign_csr(build_csr(key, WEB), 600), time.time())
    assert renewed.serial != creds.serial
    with pytest.raises(IssuerRpcError) as other:
        await client.sign_csr(build_csr(key, API), 600)
    assert other.value.code == "PERMISSION_DENIED"


async def test_mtls_listener_refuses_callers_without_certificate(
    issuer: tuple[IssuerServer, CertificateAuthority, Clock],
) -> None:
    server, ca, _ = issuer
    client = client_for(server, ca)
    client.bootstrap_address = f"127.0.0.1:{server.port}"  # point "bootstrap" (no client cert) at the mTLS port
    token = server.tokens.create(WEB, 900)
    with pytest.raises(IssuerRpcError) as refused:
        await client.sign_csr(build_csr(ec.generate_private_key(ec.SECP256R1()), WEB), 600, join_token=token)
    assert refused.value.code == "UNAVAILABLE"  # the TLS handshake itself fails


async def test_bootstrap_listener_requires_a_token(issuer: tuple[IssuerServer, CertificateAuthority, Clock]) -> None:
    server, ca, _ = issuer
    client = client_for(server, ca)
    with pytest.raises(IssuerRpcError) as refused:
        await client.sign_csr(build_csr(ec.generate_private_key(ec.SECP256R1()), WEB), 600, join_token="")
    assert refused.value.code == "UNAUTHENTICATED" and "join token is required" in refused.value.details


def rsa_csr(bits: int) -> bytes:
    return build_csr(rsa.generate_private_key(65537, bits), WEB)  # type: ignore[arg-type]


def email_san_csr() -> bytes:
    names = [x509.UniformResourceIdentifier(str(WEB)), x509.RFC822Name("root@example.org")]
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName(names), critical=False)
           .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


def ed25519_csr() -> bytes:
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(WEB))]), critical=False)
           .sign(ed25519.Ed25519PrivateKey.generate(), None))
    return csr.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(
    ("csr", "ttl_s", "code", "message"),
    [
        (lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nZ2FyYmFnZQ==\n-----END CERTIFICATE REQUEST-----\n",
         600, "INVALID_ARGUMENT", "not a PEM-encoded PKCS#10"),
        (lambda: build_csr(ec.generate_private_key(ec.SECP256R1()), SpiffeId("evil.org", "/web")),
         600, "PERMISSION_DENIED", "outside trust domain example.org"),
        (lambda: rsa_csr(1024), 600, "INVALID_ARGUMENT", "1024 bits is too weak"),
        (lambda: build_csr(ec.generate_private_key(ec.SECP521R1()), WEB), 600, "INVALID_ARGUMENT", "secp521r1"),
        (ed25519_csr, 600, "INVALID_ARGUMENT", "unsupported key type"),
        (lambda: build_csr(ec.generate_private_key(ec.SECP256R1()), WEB), 7201, "INVALID_ARGUMENT",
         "exceeds the maximum of 7200s"),
        (lambda: build_csr(ec.generate_private_key(ec.SECP256R1()), WEB, ["evil.example.com"]), 600,
         "INVALID_ARGUMENT", "'evil.example.com' is not allowed"),
        (lambda: build_csr(ec.generate_private_key(ec.SECP256R1()), WEB, ["10.0.0.1"]), 600,
         "INVALID_ARGUMENT", "'10.0.0.1' is not allowed"),
        (email_san_csr, 600, "INVALID_ARGUMENT", "SANs of kinds RFC822Name"),
    ],
    ids=["garbage", "wrong-trust-domain", "rsa-1024", "p521", "ed25519", "ttl-too-long", "dns-not-allowed",
         "ip-not-allowed", "email-san"],
)
async def test_bad_csrs_refused_with_documented_codes(
    issuer: tuple[IssuerServer, CertificateAuthority, Clock], csr: object, ttl_s: int, code: str, message: str,
) -> None:
    server, ca, _ = issuer
    creds = await bootstrap(server, ca, WEB)
    with pytest.raises(IssuerRpcError) as refused:
        await client_for(server, ca, creds).sign_csr(csr(), ttl_s)  # type: ignore[operator]
    assert refused.value.code == code and message in refused.value.details


async def test_rsa_2048_accepted(issuer: tuple[IssuerServer, CertificateAuthority, Clock]) -> None:
    server, ca, _ = issuer
    creds = await bootstrap(server, ca, WEB)
    signed = await client_for(server, ca, creds).sign_csr(rsa_csr(2048), 600)
    assert_no_private_key(signed)


async def test_signing_is_rate_limited_per_identity(issuer: tuple[IssuerServer, CertificateAuthority, Clock]) -> None:
    server, ca, _ = issuer
    creds = await bootstrap(server, ca, WEB)  # one of the burst of 8
    client = client_for(server, ca, creds)
    csr = build_csr(ec.generate_private_key(ec.SECP256R1()), WEB)
    codes = []
    for _ in range(10):
        try:
            await client.sign_csr(csr, 600)
            codes.append("OK")
        except IssuerRpcError as exc:
            codes.append(exc.code)
    assert "RESOURCE_EXHAUSTED" in codes and codes.count("OK") <= 8
    other = await bootstrap(server, ca, API)  # another identity has its own budget
    assert other.spiffe_id == API


async def test_watch_bundle_streams_root_rotation(
    issuer: tuple[IssuerServer, CertificateAuthority, Clock], tmp_path: Path,
) -> None:
    server, ca, _ = issuer
    creds = await bootstrap(server, ca, WEB)
    client = client_for(server, ca, creds)
    assert await client.bundle() == ca.bundle_pem
    stream = client.watch_bundle()
    first = await asyncio.wait_for(anext(stream), 5)
    assert first == ca.bundle_pem
    rotated = rotate_root(tmp_path / "ca", max_leaf_ttl_s=3600)
    second = await asyncio.wait_for(anext(stream), 10)
    assert second == rotated.bundle_pem and second.count(b"BEGIN CERTIFICATE") == 2
    await stream.aclose()
    # the old-root client keeps renewing during the overlap, and gets a chain that verifies under both roots
    key = ec.generate_private_key(ec.SECP256R1())
    signed = await client.sign_csr(build_csr(key, WEB), 600)
    credentials_from_chain(WEB, key, SignedChain(signed.cert_chain_pem, ca.bundle_pem), time.time())


async def test_rotator_bootstraps_with_token_then_renews_over_mtls(
    issuer: tuple[IssuerServer, CertificateAuthority, Clock],
) -> None:
    server, ca, _ = issuer
    token = server.tokens.create(WEB, 900)
    client = IssuerClient(f"127.0.0.1:{server.port}", bootstrap_address=f"127.0.0.1:{server.bootstrap_port}",
                          bundle_pem=ca.bundle_pem, join_token=token, server_name="localhost")
    first = await obtain_credentials(client, WEB, 600)  # the bootstrap path: token, no client certificate
    assert client.join_token is None  # single use: forgotten after success
    watch = Watch(first)
    client.credentials = watch.get
    rotator = Rotator(WEB, client, watch, ttl_s=600)
    assert await rotator.rotate_once()
    assert watch.get().serial != first.serial
