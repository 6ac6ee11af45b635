"""Header hygiene. Pure: lists of (lower-case name, value) in, lists out.

Inbound: hop-by-hop headers and those listed in `Connection` are dropped; identity headers a client could forge
(`x-forwarded-client-cert`, `forwarded`, `x-spiffe-*`) are never passed on. The gateway then sets its own
`x-forwarded-*`, `x-forwarded-client-cert` (Envoy's XFCC format) and `x-request-id`.
"""

from __future__ import annotations

from collections.abc import Iterable

from mesh_gateway.model import Headers, RequestInfo, SpiffeId

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
    "proxy-authenticate", "proxy-authorization", "http2-settings",
})
SPOOFABLE = frozenset({"x-forwarded-client-cert", "forwarded", "x-forwarded-proto", "x-forwarded-host"})
SPOOFABLE_PREFIXES = ("x-spiffe-",)
# Recomputed per hop by the HTTP client; a stale value would corrupt the framing.
FRAMING = frozenset({"content-length", "host"})


def connection_listed(headers: Iterable[tuple[str, str]]) -> frozenset[str]:
    listed: set[str] = set()
    for name, value in headers:
        if name == "connection":
            listed.update(token.strip().lower() for token in value.split(",") if token.strip())
    return frozenset(listed)


def strip_hop_by_hop(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    headers = list(headers)
    drop = HOP_BY_HOP | connection_listed(headers)
    return [(n, v) for n, v in headers if n not in drop]


def sanitise_inbound(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(n, v) for n, v in strip_hop_by_hop(headers)
            if n not in SPOOFABLE and not n.startswith(SPOOFABLE_PREFIXES)]


def xfcc(gateway_id: SpiffeId, client_id: SpiffeId) -> str:
    return f"By={gateway_id};URI={client_id}"


def upstream_request_headers(info: RequestInfo, gateway_id: SpiffeId, *, add: Headers = (),
                             remove: Iterable[str] = ()) -> list[tuple[str, str]]:
    """Headers to send upstream for `info`, after an authz decision's `headers`/`request_headers_to_remove`."""
    removed = frozenset(name.lower() for name in remove) | FRAMING
    out = [(n, v) for n, v in sanitise_inbound(info.headers) if n not in removed]
    forwarded_for = info.header("x-forwarded-for")
    out = [(n, v) for n, v in out if n not in ("x-forwarded-for", "x-request-id")]
    out.append(("x-forwarded-for", f"{forwarded_for}, {info.client_address}" if forwarded_for
                else info.client_address))
    out.append(("x-forwarded-proto", info.scheme))
    out.append(("x-forwarded-host", info.host))
    # The edge adopted the client's x-request-id when it sent one, so this keeps it or adds ours.
    out.append(("x-request-id", info.request_id))
    client_id = info.peer_spiffe_id
    if client_id is not None:
        out.append(("x-forwarded-client-cert", xfcc(gateway_id, client_id)))
    if add:
        replaced = {n.lower() for n, _ in add}
        out = [(n, v) for n, v in out if n not in replaced]
        out.extend((n.lower(), v) for n, v in add)
    return out


def downstream_response_headers(headers: Iterable[tuple[str, str]], *, add: Headers = ()) -> list[tuple[str, str]]:
    out = strip_hop_by_hop(headers)
    out.extend(add)
    return out
