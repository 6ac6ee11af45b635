"""OpenTelemetry semantic-convention attributes for an inbound request. Pure: no opentelemetry import needed."""

from __future__ import annotations

from mesh_gateway.model import RequestInfo

AttributeValue = str | int | float | bool
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})


def server_attributes(info: RequestInfo) -> dict[str, AttributeValue]:
    """OTel HTTP (and RPC for gRPC) semantic-convention attributes known when the request arrives."""
    method = info.method if info.method in KNOWN_METHODS else "_OTHER"
    host, port = split_authority(info.host)
    version = info.protocol.removeprefix("HTTP/")
    attrs: dict[str, AttributeValue] = {
        "http.request.method": method,
        "url.path": info.path,
        "url.scheme": info.scheme,
        "server.address": host,
        "client.address": info.client_address,
        "network.protocol.version": "2" if version == "2.0" else version,
    }
    if method == "_OTHER":
        attrs["http.request.method_original"] = info.method
    if port is not None:
        attrs["server.port"] = port
    if info.client_port:
        attrs["client.port"] = info.client_port
    agent = info.header("user-agent")
    if agent is not None:
        attrs["user_agent.original"] = agent
    peer = info.peer_spiffe_id
    if peer is not None:
        attrs["mesh.peer.spiffe_id"] = str(peer)
    if info.is_grpc:
        service, _, rpc = info.path.lstrip("/").partition("/")
        attrs.update({"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc})
    return attrs


def split_authority(authority: str) -> tuple[str, int | None]:
    """`host`, `host:port`, `[v6]:port` → (host, port or None)."""
    if authority.startswith("["):
        host, _, rest = authority[1:].partition("]")
        port = rest.removeprefix(":")
        return host, int(port) if port.isdigit() else None
    host, sep, port = authority.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        return host, int(port)
    return authority, None
