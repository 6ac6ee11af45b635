"""The in-process issuer: signs with the CA directory on disk, reloading it when `ca rotate` changed it."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from mesh_gateway.identity.ca import CAError, CertificateAuthority, cert_pem, load_ca
from mesh_gateway.identity.ca_rotation import maintain
from mesh_gateway.identity.rotation import IssuerError, SignedChain
from mesh_gateway.model import SpiffeId

log = logging.getLogger("mesh_gateway.identity")

_WATCHED = ("intermediate.pem", "intermediate.key", "bundle.pem", "cross.pem")


class LocalIssuer:
    """Issues from `directory`. With `maintain_ca` it also runs the CA chore (intermediate renewal, pruning)."""

    name = "local"

    def __init__(self, directory: Path, *, maintain_ca: bool = True) -> None:
        self.directory = directory
        self.maintain_ca = maintain_ca
        self._stamp: tuple[int, ...] = ()
        self._ca: CertificateAuthority | None = None

    def _fingerprint(self) -> tuple[int, ...]:
        stamp: list[int] = []
        for name in _WATCHED:
            try:
                st = (self.directory / name).stat()
            except FileNotFoundError:
                stamp += [0, 0]
                continue
            stamp += [st.st_mtime_ns, st.st_ino]
        return tuple(stamp)

    def current(self, now: dt.datetime | None = None) -> CertificateAuthority:
        """The CA as on disk now (reloaded only when a watched file changed)."""
        if self.maintain_ca:
            done = maintain(self.directory, now)
            if done.changed:
                log.info("CA maintenance: prepared=%s activated=%s pruned=%s", done.prepared, done.activated,
                         list(done.pruned), extra={"event": "ca_maintenance"})
        stamp = self._fingerprint()
        if self._ca is None or stamp != self._stamp:
            self._ca = load_ca(self.directory)
            self._stamp = stamp
        return self._ca

    def _sign(self, public_key: ec.EllipticCurvePublicKey, spiffe_id: SpiffeId, ttl_s: float,
              dns: Sequence[str]) -> SignedChain:
        try:
            ca = self.current()
            leaf = ca.issue(public_key, spiffe_id, ttl_s, dns)
        except (CAError, OSError, ValueError) as exc:
            raise IssuerError(f"local CA {self.directory}: {exc}") from None
        return SignedChain(cert_pem(leaf) + b"".join(cert_pem(c) for c in ca.chain), ca.bundle_pem)

    async def sign(self, key: ec.EllipticCurvePrivateKey, spiffe_id: SpiffeId, ttl_s: float,
                   dns: Sequence[str]) -> SignedChain:
        return await asyncio.to_thread(self._sign, key.public_key(), spiffe_id, ttl_s, dns)

    async def bundle(self) -> bytes:
        def read() -> bytes:
            try:
                return self.current().bundle_pem
            except (CAError, OSError) as exc:
                raise IssuerError(f"local CA {self.directory}: {exc}") from None

        return await asyncio.to_thread(read)
