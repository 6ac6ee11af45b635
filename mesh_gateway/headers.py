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


# Everything upstream_request_headers drops from the inbound headers before adding the gateway's own.
_NOT_FORWARDED = HOP_BY_HOP | SPOOFABLE | FRAMING | {"x-forwarded-for", "x-request-id"}


def connection_listed(headers: Iterable[tuple[str, str]]) -> frozenset[str]:
    listed: set[str] = set()
    for name, value in headers:
        if name == "connection":
            for token in value.lower().split(","):
                token = token.strip()
                if token:
                    listed.add(token)
    return frozenset(listed)


def strip_hop_by_hop(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    if not isinstance(headers, list | tuple):
        headers = list(headers)
    listed = connection_listed(headers)
    if listed:
        return [header for header in headers if header[0] not in HOP_BY_HOP and header[0] not in listed]
    return [header for header in headers if header[0] not in HOP_BY_HOP]


def sanitise_inbound(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(n, v) for n, v in strip_hop_by_hop(headers)
            if n not in SPOOFABLE and not n.startswith(SPOOFABLE_PREFIXES)]


def xfcc(gateway_id: SpiffeId, client_id: SpiffeId) -> str:
    return f"By={gateway_id};URI={client_id}"


def upstream_request_headers(info: RequestInfo, gateway_id: SpiffeId, *, add: Headers = (),
                             remove: Iterable[str] = ()) -> list[tuple[str, str]]:
    """Headers to send upstream for `info`, after an authz decision's `headers`/`request_headers_to_remove`.

    One pass over the inbound headers (this runs for every request): hop-by-hop, Connection-listed, spoofable,
    framing and removed headers are dropped together, then the gateway's own are appended."""
    headers = info.headers
    listed = connection_listed(headers)
    drop = _NOT_FORWARDED
    if listed or remove:
        drop = drop | listed | {name.lower() for name in remove}
    forwarded_for: str | None = None
    out: list[tuple[str, str]] = []
    for header in headers:
        name = header[0]
        if name in drop:
            if forwarded_for is None and name == "x-forwarded-for":
                forwarded_for = header[1]  # the first one, as the client (or the hop before) sent it
        elif not name.startswith(SPOOFABLE_PREFIXES):
            out.append(header)
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
    if add:
        out.extend(add)
    return out
