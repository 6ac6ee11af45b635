"""The CSR issuance API (gRPC, identity/proto/issuer.proto): the service and the client that uses it.

Two listeners, because grpcio's server credentials either require and verify a client certificate or do not ask
for one at all (there is no "verify if presented" mode):
  * the mTLS listener requires a client certificate chaining to the current bundle; the caller may renew only the
    SPIFFE ID in that certificate (read from the auth context: grpc verifies chains, not SPIFFE IDs);
  * the bootstrap listener is server-authenticated TLS only and signs only with a one-time join token
    (`authorization: Bearer <token>`), for exactly the SPIFFE ID the token binds.
Both serve Bundle and WatchBundle. The server signs public keys from CSRs; it never generates or returns a key.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mesh_gateway.errors import BadRequest, Forbidden, GatewayError, Unauthenticated
from mesh_gateway.identity.ca import CAError, cert_pem
from mesh_gateway.identity.csr import CsrPolicy, check_csr
from mesh_gateway.identity.join_tokens import JoinTokenStore
from mesh_gateway.identity.local_issuer import LocalIssuer
from mesh_gateway.identity.proto import issuer_pb2, issuer_pb2_grpc
from mesh_gateway.identity.rotation import IssuerError, Rotator, SignedChain
from mesh_gateway.model import Credentials, SpiffeId
from mesh_gateway.spiffe import IdentityError, spiffe_id_from_uris
from mesh_gateway.watch import Watch

log = logging.getLogger("mesh_gateway.identity")

RPC_TIMEOUT_S = 10.0
WATCH_POLL_S = 30.0


class RateLimited(GatewayError):
    status, grpc_code, public_message = 429, "RESOURCE_EXHAUSTED", "signing rate limit exceeded; retry later"


class RateLimiter:
    """Token bucket per identity; the table is bounded so a flood of identities cannot grow it without limit."""

    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 10_000) -> None:
        self.rate_s = per_minute / 60.0
        self.burst = float(burst)
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> None:
        now = self.clock()
        tokens, stamp = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - stamp) * self.rate_s)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            raise RateLimited(f"rate limit for {key}")
        self._buckets[key] = (tokens - 1, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)


@dataclass(frozen=True, slots=True)
class Caller:
    spiffe_id: SpiffeId
    token: str | None = None


def _peer_identity(context: grpc.aio.ServicerContext[Any, Any], trust_domain: str) -> SpiffeId:
    auth = context.auth_context()
    uris = [v.decode() for v in auth.get("peer_uri", [])]
    if not auth.get("x509_pem_cert"):
        raise Unauthenticated("no client certificate")
    try:
        peer = spiffe_id_from_uris(uris)
    except IdentityError as exc:
        raise Unauthenticated(str(exc), public_message=f"client certificate is not an X.509 SVID: {exc}") from None
    if not peer.member_of(trust_domain):
        raise Unauthenticated(f"peer {peer} outside trust domain")
    return peer


def _bearer(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


class IssuerService(issuer_pb2_grpc.IssuerServicer):
    """One listener's view: `mtls=True` authenticates by client certificate, `mtls=False` by join token."""

    def __init__(self, issuer: LocalIssuer, policy: CsrPolicy, tokens: JoinTokenStore, limiter: RateLimiter,
                 bundle: Watch[Credentials], *, mtls: bool) -> None:
        self.issuer = issuer
        self.policy = policy
        self.tokens = tokens
        self.limiter = limiter
        self.bundle_source = bundle
        self.mtls = mtls

    async def _authenticate(self, context: grpc.aio.ServicerContext[Any, Any]) -> Caller:
        if self.mtls:
            return Caller(_peer_identity(context, self.policy.trust_domain))
        token = _bearer(context)
        if token is None:
            raise Unauthenticated("no token", public_message="a join token is required on the bootstrap listener "
                                                            "(metadata 'authorization: Bearer <token>')")
        grant = await asyncio.to_thread(self.tokens.check, token)
        return Caller(grant.spiffe_id, token)

    async def Sign(self, request: issuer_pb2.SignRequest,  # name fixed by the .proto
                   context: grpc.aio.ServicerContext[Any, Any]) -> issuer_pb2.SignResponse:
        caller: Caller | None = None
        try:
            caller = await self._authenticate(context)
            checked = check_csr(request.csr_pem, request.ttl_s, self.policy)
            if checked.spiffe_id != caller.spiffe_id:
                how = "join token" if caller.token else "client certificate"
                raise Forbidden(f"{caller.spiffe_id} asked for {checked.spiffe_id}",
                                public_message=f"this {how} may obtain only {caller.spiffe_id}, "
                                               f"not {checked.spiffe_id}")
            self.limiter.take(str(caller.spiffe_id))
            if caller.token is not None:
                # Burned only now, after the CSR passed every check: a typo does not waste the token.
                await asyncio.to_thread(self.tokens.consume, caller.token)
            chain, bundle, serial = await asyncio.to_thread(self._issue, checked.public_key, checked.spiffe_id,
                                                            checked.ttl_s, checked.dns)
        except GatewayError as exc:
            await self._refuse(context, exc, caller)
            raise  # context.abort raised already; this keeps type checkers honest
        log.info("signed %s serial=%x ttl=%.0fs via %s", checked.spiffe_id, serial, checked.ttl_s,
                 "join token" if caller.token else "mTLS renewal",
                 extra={"event": "svid_signed", "spiffe_id": str(checked.spiffe_id), "serial": f"{serial:x}",
                        "ttl_s": checked.ttl_s, "bootstrap": caller.token is not None})
        return issuer_pb2.SignResponse(cert_chain_pem=chain, bundle_pem=bundle)

    def _issue(self, public_key: Any, spiffe_id: SpiffeId, ttl_s: float,
               dns: Sequence[str]) -> tuple[list[str], str, int]:
        try:
            ca = self.issuer.current()
            leaf = ca.issue(public_key, spiffe_id, ttl_s, dns)
        except CAError as exc:
            raise BadRequest(str(exc), public_message=f"cannot issue: {exc}") from None
        chain = [cert_pem(leaf).decode(), *(cert_pem(c).decode() for c in ca.chain)]
        return chain, ca.bundle_pem.decode(), leaf.serial_number

    async def _refuse(self, context: grpc.aio.ServicerContext[Any, Any], exc: GatewayError,
                      caller: Caller | None) -> None:
        log.warning("signing refused: %s", exc.detail or exc.public_message,
                    extra={"event": "sign_refused", "code": exc.grpc_code,
                           "caller": str(caller.spiffe_id) if caller else None})
        await context.abort(getattr(grpc.StatusCode, exc.grpc_code), exc.public_message)

    async def Bundle(self, request: issuer_pb2.BundleRequest,
                     context: grpc.aio.ServicerContext[Any, Any]) -> issuer_pb2.BundleResponse:
        return issuer_pb2.BundleResponse(bundle_pem=self.bundle_source.get().bundle_pem.decode())

    async def WatchBundle(self, request: issuer_pb2.BundleRequest,
                          context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[issuer_pb2.BundleResponse]:
        sent = b""
        while True:
            version = self.bundle_source.version
            bundle = self.bundle_source.get().bundle_pem
            if bundle != sent:
                yield issuer_pb2.BundleResponse(bundle_pem=bundle.decode())
                sent = bundle
            # bounded wait: the loop re-checks even if a wake-up were missed; server stop cancels the stream
            await self.bundle_source.changed(version, WATCH_POLL_S)


@dataclass(frozen=True, slots=True)
class IssuerSettings:
    """How `ca serve` runs the service; built from CLI flags."""

    address: str = "127.0.0.1:8501"
    bootstrap_address: str | None = "127.0.0.1:8502"
    spiffe_id_path: str = "/mesh-gateway/issuer"
    dns: tuple[str, ...] = ("localhost",)
    svid_ttl_s: float = 3600.0
    max_ttl_s: float = 86400.0
    default_ttl_s: float = 3600.0
    allowed_dns: tuple[str, ...] = ()
    sign_per_minute: float = 10.0
    sign_burst: int = 5
    bundle_poll_s: float = 5.0
    """How often the CA directory is checked for a new bundle (root rotation) to push to WatchBundle streams."""


class IssuerServer:
    """The issuance API over a CA directory, with its own rotating SVID and CA maintenance."""

    def __init__(self, issuer: LocalIssuer, settings: IssuerSettings, tokens: JoinTokenStore | None = None) -> None:
        self.issuer = issuer
        self.settings = settings
        self.tokens = tokens or JoinTokenStore(issuer.directory)
        self.port = 0
        self.bootstrap_port = 0
        self.credentials: Watch[Credentials] | None = None
        self.rotator: Rotator | None = None
        self._servers: list[grpc.aio.Server] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        ca = await asyncio.to_thread(self.issuer.current)
        own = SpiffeId(ca.trust_domain, self.settings.spiffe_id_path)
        first = await asyncio.to_thread(ca.issue_credentials, own, self.settings.svid_ttl_s, self.settings.dns)
        self.credentials = Watch(first)
        self.rotator = Rotator(own, self.issuer, self.credentials, ttl_s=self.settings.svid_ttl_s,
                               dns=self.settings.dns, bundle_poll_s=self.settings.bundle_poll_s)
        policy = CsrPolicy(ca.trust_domain, self.settings.max_ttl_s, self.settings.default_ttl_s,
                           self.settings.allowed_dns)
        limiter = RateLimiter(self.settings.sign_per_minute, self.settings.sign_burst)
        listeners = [(self.settings.address, True)]
        if self.settings.bootstrap_address:
            listeners.append((self.settings.bootstrap_address, False))
        for address, mtls in listeners:
            server = grpc.aio.server()
            service = IssuerService(self.issuer, policy, self.tokens, limiter, self.credentials, mtls=mtls)
            issuer_pb2_grpc.add_IssuerServicer_to_server(service, server)  # type: ignore[no-untyped-call]
            port = server.add_secure_port(address, self._server_credentials(require_client_cert=mtls))
            if port == 0:
                raise OSError(f"cannot listen on {address}")
            await server.start()
            self._servers.append(server)
            if mtls:
                self.port = port
            else:
                self.bootstrap_port = port
        self._task = asyncio.create_task(self.rotator.run(), name="issuer-svid-rotator")
        log.info("issuer API listening: mTLS %s, bootstrap %s", self.settings.address,
                 self.settings.bootstrap_address or "off", extra={"event": "issuer_started"})

    def _server_credentials(self, *, require_client_cert: bool) -> grpc.ServerCredentials:
        watch = self.credentials
        assert watch is not None
        seen = [watch.version]

        def configuration(creds: Credentials) -> Any:
            return grpc.ssl_server_certificate_configuration(
                [(creds.key_pem, creds.cert_chain_pem)],
                root_certificates=creds.bundle_pem if require_client_cert else None)

        def fetch() -> Any:
            # Called by grpc for each new handshake (on its own thread): hand over a rotated SVID or bundle.
            version = watch.version
            if version == seen[0]:
                return None
            seen[0] = version
            return configuration(watch.get())

        return grpc.dynamic_ssl_server_credentials(configuration(watch.get()), fetch,
                                                   require_client_authentication=require_client_cert)

    async def stop(self, grace_s: float = 1.0) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*(server.stop(grace_s) for server in self._servers))
        self._servers.clear()

    async def wait(self) -> None:
        """Until the SVID rotator dies (fatal: the server would go on with an expiring certificate)."""
        assert self._task is not None
        await asyncio.shield(self._task)


def build_csr(key: ec.EllipticCurvePrivateKey, spiffe_id: SpiffeId, dns: Sequence[str] = ()) -> bytes:
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
    for name in dns:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, spiffe_id.trust_domain)]))
           .add_extension(x509.SubjectAlternativeName(names), critical=False)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


class IssuerRpcError(IssuerError):
    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


class IssuerClient:
    """Talks to the issuance API. An `Issuer` for the Rotator (identity.issuer: remote) and for sidecars.

    With current credentials it renews over mTLS at `address`; without, it bootstraps once at
    `bootstrap_address` with the join token (which is then forgotten: tokens are single use).
    """

    name = "remote"

    def __init__(self, address: str, *, bundle_pem: bytes, bootstrap_address: str | None = None,
                 join_token: str | None = None, credentials: Callable[[], Credentials | None] = lambda: None,
                 server_name: str | None = None, timeout_s: float = RPC_TIMEOUT_S) -> None:
        self.address = address
        self.bootstrap_address = bootstrap_address
        self.join_token = join_token
        self.credentials = credentials
        self.initial_bundle = bundle_pem
        self.server_name = server_name
        self.timeout_s = timeout_s

    def _channel(self, *, bootstrap: bool) -> grpc.aio.Channel:
        creds = self.credentials()
        roots = creds.bundle_pem if creds else self.initial_bundle
        if bootstrap or creds is None:
            if not self.bootstrap_address:
                raise IssuerError("no credentials yet and no bootstrap address configured")
            target = self.bootstrap_address
            channel_creds = grpc.ssl_channel_credentials(roots)
        else:
            target = self.address
            channel_creds = grpc.ssl_channel_credentials(roots, creds.key_pem, creds.cert_chain_pem)
        options = [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
        return grpc.aio.secure_channel(target, channel_creds, options=options)

    async def sign_csr(self, csr_pem: bytes, ttl_s: float = 0, *, join_token: str | None = None) -> SignedChain:
        """One Sign call. Bootstraps (no client cert, token as metadata) when `join_token` is given."""
        bootstrap = join_token is not None
        metadata = (("authorization", f"Bearer {join_token}"),) if bootstrap else None
        try:
            async with self._channel(bootstrap=bootstrap) as channel:
                stub = issuer_pb2_grpc.IssuerStub(channel)  # type: ignore[no-untyped-call]
                reply = await stub.Sign(issuer_pb2.SignRequest(csr_pem=csr_pem.decode(), ttl_s=int(ttl_s)),
                                        metadata=metadata, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise IssuerRpcError(exc.code().name, exc.details() or "") from None
        return SignedChain("".join(reply.cert_chain_pem).encode(), reply.bundle_pem.encode())

    async def sign(self, key: ec.EllipticCurvePrivateKey, spiffe_id: SpiffeId, ttl_s: float,
                   dns: Sequence[str]) -> SignedChain:
        csr = build_csr(key, spiffe_id, dns)
        if self.credentials() is None:
            if self.join_token is None:
                raise IssuerError("no credentials to renew with and no join token to bootstrap with")
            signed = await self.sign_csr(csr, ttl_s, join_token=self.join_token)
            self.join_token = None
            return signed
        return await self.sign_csr(csr, ttl_s)

    async def bundle(self) -> bytes:
        try:
            async with self._channel(bootstrap=self.credentials() is None) as channel:
                stub = issuer_pb2_grpc.IssuerStub(channel)  # type: ignore[no-untyped-call]
                reply = await stub.Bundle(issuer_pb2.BundleRequest(), timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise IssuerRpcError(exc.code().name, exc.details() or "") from None
        return bytes(reply.bundle_pem.encode())

    async def watch_bundle(self) -> AsyncIterator[bytes]:
        """The bundle now and after every change, until the caller stops iterating or the stream breaks."""
        try:
            async with self._channel(bootstrap=self.credentials() is None) as channel:
                stub = issuer_pb2_grpc.IssuerStub(channel)  # type: ignore[no-untyped-call]
                async for reply in stub.WatchBundle(issuer_pb2.BundleRequest()):
                    yield reply.bundle_pem.encode()
        except grpc.aio.AioRpcError as exc:
            raise IssuerRpcError(exc.code().name, exc.details() or "") from None
