"""build_input(info, route, ...) -> the Envoy ext_authz `CheckRequest` AttributeContext as OPA-Envoy shapes it. Pure.

Policies written for opa-envoy-plugin read `input.attributes.request.http.*`, `input.parsed_path`,
`input.parsed_query` and `input.parsed_body`; this module builds exactly those keys (protojson names, as the
plugin sends them) plus `input.source_principal` and `input.route`. docs/authz.md documents every field.

Path normalisation (the defence against policy bypass through encoding) happens at the edge, once, before routing:
see mesh_gateway/paths.py. The same normalised path is routed, authorized and forwarded.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
from typing import Any
from urllib.parse import parse_qs, quote

from mesh_gateway.headers import HOP_BY_HOP, SPOOFABLE, SPOOFABLE_PREFIXES, connection_listed
from mesh_gateway.model import BodyPrefix, RequestInfo, Route, SpiffeId
from mesh_gateway.paths import NormalisedPath
from mesh_gateway.stamps import UtcStamps

INPUT_VERSION = {"encoding": "protojson", "ext_authz": "v3"}
_DROPPED = HOP_BY_HOP | SPOOFABLE
_STAMPS = UtcStamps(timespec="microseconds")


def _headers(info: RequestInfo, path: str, extra: dict[str, str]) -> dict[str, str]:
    """Lower-cased names; repeated headers joined with ',' as Envoy does (cookies with '; ').

    Sanitised first, as Envoy's ext_authz sees them: hop-by-hop headers and identity headers a client could
    forge (`x-forwarded-client-cert`, `forwarded`, `x-spiffe-*`) are gone; the gateway's own are added.
    (headers.sanitise_inbound's rules, applied in the merge loop rather than as separate passes.)"""
    merged: dict[str, str] = {
        ":authority": info.host,
        ":method": info.method,
        ":path": path,
        ":scheme": info.scheme,
    }
    headers = info.headers
    dropped = _DROPPED
    for name, _ in headers:
        if name == "connection":  # it names further hop-by-hop headers
            dropped = _DROPPED | connection_listed(headers)
            break
    for name, value in headers:
        if name in dropped or name.startswith(SPOOFABLE_PREFIXES):
            continue
        if name in merged and not name.startswith(":"):
            merged[name] += ("; " if name == "cookie" else ",") + value
        else:
            merged[name] = value
    merged.update(extra)
    return merged


def xfcc(gateway_id: SpiffeId | None, client_id: SpiffeId, cert_der: bytes | None) -> str:
    """Envoy's `x-forwarded-client-cert` for SANITIZE_SET with URI details: `By=..;Hash=..;URI=..`."""
    parts = [f"By={gateway_id}"] if gateway_id else []
    if cert_der:
        parts.append(f"Hash={_certificate_fields(cert_der)[1]}")
    parts.append(f"URI={client_id}")
    return ";".join(parts)


def _pem(der: bytes) -> str:
    body = base64.b64encode(der).decode()
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return "-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n"


@functools.lru_cache(maxsize=1024)
def _certificate_fields(der: bytes) -> tuple[str, str]:
    """(URL-encoded PEM for `source.certificate`, SHA-256 hex for the XFCC `Hash`) of a client certificate.

    Every request on a connection carries the same certificate, and `quote` of a ~1 KB PEM alone cost ~40 µs a
    request; the key is the DER itself (bytes cache their hash, so a lookup with the connection's object is cheap)."""
    return quote(_pem(der), safe=""), hashlib.sha256(der).hexdigest()


def _socket(address: str, port: int) -> dict[str, Any]:
    return {"socketAddress": {"address": address, "portValue": port}}


def parse_query(query: str) -> dict[str, list[str]]:
    """`input.parsed_query`: exactly `urllib.parse.parse_qs(query, keep_blank_values=True)`. A query with nothing
    to decode (no `%`, no `+`) is split directly, at a fraction of parse_qs's cost; tests/test_authz_input.py
    checks that the two agree."""
    if "%" in query or "+" in query:
        return parse_qs(query, keep_blank_values=True)
    parsed: dict[str, list[str]] = {}
    for field in query.split("&"):
        if field:
            name, _, value = field.partition("=")
            if name in parsed:
                parsed[name].append(value)
            else:
                parsed[name] = [value]
    return parsed


def parse_body(body: BodyPrefix, content_type: str | None) -> tuple[Any, bool]:
    """OPA-Envoy's rule: JSON bodies are parsed; a truncated or unparsable body gives no `parsed_body`."""
    if body.truncated or not body.data:
        return None, body.truncated
    if content_type is None or "json" not in content_type.split(";", 1)[0].lower():
        return None, False
    try:
        return json.loads(body.data), False
    except (ValueError, UnicodeDecodeError):
        return None, False


def build_input(info: RequestInfo, route: Route, *, normalised: NormalisedPath, now: float,
                gateway_id: SpiffeId | None = None, body: BodyPrefix | None = None) -> dict[str, Any]:
    """The `input` document for one request; `now` is the wall-clock time in seconds."""
    query = info.query
    target = normalised.path + (f"?{query}" if query else "")
    peer = info.peer_spiffe_id
    principal = str(peer) if peer is not None else ""
    extra = {"x-request-id": info.request_id, "x-forwarded-proto": info.scheme}
    if peer is not None:
        extra["x-forwarded-client-cert"] = xfcc(gateway_id, peer, info.peer.der if info.peer else None)
    source: dict[str, Any] = {"address": _socket(info.client_address, info.client_port)}
    if peer is not None:
        source["principal"] = principal
        if info.peer is not None and info.peer.der:
            source["certificate"] = _certificate_fields(info.peer.der)[0]
    destination: dict[str, Any] = {"address": _socket(info.local_address, info.local_port)}
    if gateway_id is not None:
        destination["principal"] = str(gateway_id)
    http: dict[str, Any] = {
        "id": info.request_id,
        "method": info.method,
        "headers": _headers(info, target, extra),
        "path": target,
        "host": info.host,
        "scheme": info.scheme,
        "protocol": info.protocol,
        "size": info.content_length if info.content_length is not None else -1,
    }
    stamp = _STAMPS(now)
    document: dict[str, Any] = {
        "attributes": {
            "source": source,
            "destination": destination,
            "request": {"time": stamp, "http": http},
            "tls_session": {"sni": info.sni} if info.sni else {},
            "metadataContext": {},
        },
        "parsed_path": list(normalised.segments),
        "parsed_query": parse_query(query),
        "version": dict(INPUT_VERSION),
        "source_principal": principal,
        "route": {"name": route.name, "service": route.service},
    }
    if body is not None:
        parsed, truncated = parse_body(body, info.header("content-type"))
        document["truncated_body"] = truncated
        if parsed is not None:
            document["parsed_body"] = parsed
        # Envoy sends the (possibly partial) body as text alongside; OPA-Envoy parses it only when whole.
        http["body"] = body.data.decode("utf-8", "replace")
    return document
