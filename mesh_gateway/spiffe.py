"""Peer identity from certificates as the ssl module reports them. Pure: no crypto library needed."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from mesh_gateway.model import SpiffeId


class IdentityError(ValueError):
    pass


def uri_sans(peercert: dict[str, Any] | None) -> list[str]:
    """URI SANs from `SSLObject.getpeercert()` (the decoded form)."""
    if not peercert:
        return []
    sans: Iterable[tuple[str, str]] = peercert.get("subjectAltName", ())
    return [value for kind, value in sans if kind == "URI"]


def spiffe_id_from_uris(uris: list[str]) -> SpiffeId:
    """The one SPIFFE ID of an X509-SVID: exactly one URI SAN, and it must parse."""
    if len(uris) != 1:
        raise IdentityError(f"certificate must carry exactly one URI SAN, found {len(uris)}")
    try:
        return SpiffeId.parse(uris[0])
    except ValueError as exc:
        raise IdentityError(str(exc)) from None


def spiffe_id_from_peercert(peercert: dict[str, Any] | None) -> SpiffeId:
    return spiffe_id_from_uris(uri_sans(peercert))
