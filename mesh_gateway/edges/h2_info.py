"""HTTP/2 request heads → RequestInfo for the h2 edge, under the listener's limits."""

from __future__ import annotations

import asyncio

from mesh_gateway.edges.http import HttpEdge, transport_peer
from mesh_gateway.errors import BadRequest, HeadersTooLarge, PayloadTooLarge, UriTooLong
from mesh_gateway.model import RequestInfo
from mesh_gateway.paths import UnsafePath, normalise_path


def request_info(edge: HttpEdge, transport: asyncio.Transport | None, pseudo: dict[str, str],
                 fields: list[tuple[str, str]], request_id: str) -> RequestInfo:
    """An HTTP/2 request's head → RequestInfo, under the listener's limits (same statuses as HTTP/1.1)."""
    limits = edge.limits
    method, target = pseudo.get(":method", ""), pseudo.get(":path", "")
    if len(target) + len(method) + 12 > limits.max_request_line_bytes:
        raise UriTooLong(f"request target of {len(target)} bytes")
    if len(fields) > limits.max_headers:
        raise HeadersTooLarge(f"{len(fields)} header fields")
    size = sum(len(k) + len(v) + 4 for k, v in fields)
    if size > limits.max_header_bytes:
        raise HeadersTooLarge(f"{size} bytes of headers")
    length_text = next((v for k, v in fields if k == "content-length"), None)
    content_length = int(length_text) if length_text is not None and length_text.isdigit() else None
    if content_length is not None and content_length > limits.max_body_bytes:
        raise PayloadTooLarge(f"declared body of {content_length} bytes")
    client = transport.get_extra_info("peername") if transport else None
    local = transport.get_extra_info("sockname") if transport else None
    ssl_object = transport.get_extra_info("ssl_object") if transport else None
    raw, _, query = target.partition("?")
    try:
        path = normalise_path(raw).path  # one path for routing, policy and upstream, as on HTTP/1.1
    except UnsafePath as exc:
        raise BadRequest(str(exc), public_message="ambiguous request path") from None
    return RequestInfo(
        method=method, path=path, query=query,
        host=pseudo.get(":authority") or next((v for k, v in fields if k == "host"), ""),
        scheme=edge.scheme, headers=tuple(fields),
        client_address=client[0] if client else "", client_port=client[1] if client else 0,
        request_id=request_id, protocol="HTTP/2", listener=edge.name,
        local_address=local[0] if local else "", local_port=local[1] if local else 0,
        peer=transport_peer(transport), sni=ssl_object.server_hostname if ssl_object is not None else None,
        content_length=content_length,
    )


def rejected_info(edge: HttpEdge, transport: asyncio.Transport | None, pseudo: dict[str, str],
                  request_id: str) -> RequestInfo:
    """What may safely be kept of a request that broke a limit: no headers, a bounded path, no query."""
    client = transport.get_extra_info("peername") if transport else None
    return RequestInfo(
        method=pseudo.get(":method", "")[:16], path=pseudo.get(":path", "").partition("?")[0][:256], query="",
        host=pseudo.get(":authority", "")[:256], scheme=edge.scheme, headers=(),
        client_address=client[0] if client else "", client_port=client[1] if client else 0,
        request_id=request_id, protocol="HTTP/2", listener=edge.name)
