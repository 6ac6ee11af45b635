"""SSLContexts built from Credentials, and hot swap of the serving identity without a restart.

The ssl module only loads a certificate chain from a file, so the chain and key go through an anonymous
in-memory file (memfd) where the platform has one: the key never touches disk here.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from mesh_gateway.model import Credentials, Endpoint, SpiffeId
from mesh_gateway.spiffe import IdentityError, spiffe_id_from_peercert
from mesh_gateway.watch import Watch

ClientAuth = Literal["none", "optional", "required"]
_VERIFY = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def load_chain(context: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    data = chain_pem + b"\n" + key_pem
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("mesh-gateway-svid", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            context.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="mesh-gateway-") as tmp:
        path = Path(tmp) / "svid.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        context.load_cert_chain(str(path))


def _minimum(version: str) -> ssl.TLSVersion:
    return ssl.TLSVersion.TLSv1_3 if version == "1.3" else ssl.TLSVersion.TLSv1_2


def server_context(chain_pem: bytes, key_pem: bytes, *, client_auth: ClientAuth, client_ca_pem: bytes | None,
                   min_version: str = "1.2", alpn: tuple[str, ...] = ("http/1.1",)) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _minimum(min_version)
    # Session tickets would resume with the identity of a rotated-away certificate.
    context.num_tickets = 0
    context.options |= ssl.OP_NO_TICKET
    load_chain(context, chain_pem, key_pem)
    context.verify_mode = _VERIFY[client_auth]
    if client_auth != "none":
        if not client_ca_pem:
            raise ValueError("client certificate verification needs a CA bundle")
        context.load_verify_locations(cadata=client_ca_pem.decode())
    context.set_alpn_protocols(list(alpn))
    return context


def client_context(credentials: Credentials | None, bundle_pem: bytes, *, expected: SpiffeId | None = None,
                   alpn: tuple[str, ...] = ("http/1.1",)) -> UpstreamContext:
    """Client context for mTLS into the mesh: the chain is verified against the bundle; host names are not,
    because the peer's identity is its SPIFFE ID, checked after the handshake by the caller."""
    context = UpstreamContext(ssl.PROTOCOL_TLS_CLIENT)
    context.expected_spiffe_id = expected
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # spiffe-checked: UpstreamContext.expected_spiffe_id is verified per connection
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=bundle_pem.decode())
    if credentials is not None:
        load_chain(context, credentials.cert_chain_pem, credentials.key_pem)
    context.set_alpn_protocols(list(alpn))
    return context


class UpstreamContext(ssl.SSLContext):
    """A client context that remembers which SPIFFE ID its peers must present."""

    expected_spiffe_id: SpiffeId | None = None


class UpstreamContexts:
    """Client contexts for upstream endpoints, one per (expected SPIFFE ID, credentials version).

    Connection pools are keyed by context, so a connection verified for one identity is never reused for
    another, and a rotated SVID starts a new generation of connections while the old ones finish.
    """

    def __init__(self, credentials: Watch[Credentials], *, alpn: tuple[str, ...] = ("http/1.1",)) -> None:
        self._credentials = credentials
        self._alpn = alpn
        self._contexts: dict[tuple[SpiffeId | None, bool, int], UpstreamContext] = {}

    def for_endpoint(self, endpoint: Endpoint) -> UpstreamContext | None:
        """None for a plain-HTTP endpoint; `mtls` presents the current SVID, `tls` presents none."""
        if endpoint.tls == "plain":
            return None
        version = self._credentials.version
        key = (endpoint.spiffe_id, endpoint.tls == "mtls", version)
        context = self._contexts.get(key)
        if context is None:
            if len(self._contexts) > 1024 or any(k[2] != version for k in self._contexts):
                self._contexts = {k: c for k, c in self._contexts.items() if k[2] == version}
            creds = self._credentials.get()
            context = client_context(creds if endpoint.tls == "mtls" else None, creds.bundle_pem,
                                     expected=endpoint.spiffe_id, alpn=self._alpn)
            self._contexts[key] = context
        return context


def peer_spiffe_id(ssl_object: Any) -> SpiffeId | None:
    """The peer's SPIFFE ID, None when it sent no certificate; IdentityError for a cert without exactly one."""
    if ssl_object is None:
        return None
    peercert = ssl_object.getpeercert()
    if not peercert:
        return None
    return spiffe_id_from_peercert(peercert)


def verify_peer(ssl_object: Any, expected: SpiffeId) -> None:
    try:
        actual = peer_spiffe_id(ssl_object)
    except IdentityError as exc:
        raise IdentityError(f"upstream certificate rejected: {exc}") from None
    if actual != expected:
        raise IdentityError(f"upstream presented {actual}, expected {expected}")


class ServerTls:
    """The listener's TLS: a front context whose SNI callback hands each handshake the current context.

    Rotation publishes new Credentials; the next handshake gets a context built from them, while connections
    already established keep the context they were made with.
    """

    def __init__(self, *, client_auth: ClientAuth, min_version: str, credentials: Watch[Credentials] | None,
                 static_chain: tuple[bytes, bytes] | None = None, client_ca_pem: bytes | None = None,
                 alpn: tuple[str, ...] = ("http/1.1",),
                 on_handshake_error: Callable[[], None] | None = None) -> None:
        if credentials is None and static_chain is None:
            raise ValueError("a listener needs either the gateway SVID or a certificate and key")
        self._client_auth = client_auth
        self._min_version = min_version
        self._credentials = credentials
        self._static_chain = static_chain
        self._client_ca_pem = client_ca_pem
        self._alpn = alpn
        self._built_for = self._version()
        self._current = self._build()
        self.front = self._build()
        self.front.sni_callback = self._select
        if on_handshake_error is not None:
            self.front.sslobject_class = _counting_sslobject(on_handshake_error)

    def _build(self) -> ssl.SSLContext:
        creds = self._credentials.get() if self._credentials else None
        chain, key = self._static_chain if self._static_chain else (creds.cert_chain_pem, creds.key_pem)  # type: ignore[union-attr]
        bundle = self._client_ca_pem or (creds.bundle_pem if creds else None)
        return server_context(chain, key, client_auth=self._client_auth, client_ca_pem=bundle,
                              min_version=self._min_version, alpn=self._alpn)

    def _version(self) -> int:
        return self._credentials.version if self._credentials else 0

    def current(self) -> ssl.SSLContext:
        version = self._version()
        if self._built_for != version:
            self._current = self._build()
            self._built_for = version
        return self._current

    def _select(self, ssl_object: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        current = self.current()
        if ssl_object.context is not current:
            ssl_object.context = current


def _counting_sslobject(on_failure: Callable[[], None]) -> type[ssl.SSLObject]:
    """An SSLObject class that reports failed handshakes.

    asyncio and uvloop drop a failed inbound handshake silently (a log line only in debug mode); they drive the
    handshake through `SSLObject.do_handshake`, so counting happens there, once per connection, off the data path.
    """

    class CountingSSLObject(ssl.SSLObject):
        def do_handshake(self) -> None:
            try:
                super().do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise
            except ssl.SSLError:
                on_failure()
                raise

    return CountingSSLObject
