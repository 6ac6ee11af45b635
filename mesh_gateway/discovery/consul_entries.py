"""Consul answers → our values. Pure: JSON in, frozen values and warnings out.

- health entries → `Endpoint`s with the SPIFFE ID the upstream must present;
- catalog services and their tags → which services to watch and Traefik-style routes.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from mesh_gateway.model import Endpoint, Route, RouteMatch, SpiffeId

ENABLE_TAG = "mesh-gateway.enable=true"
TAG_PREFIX = "mesh-gateway."
ROUTE_KEYS = frozenset({"route.host", "route.path_prefix"})
_HOST = re.compile(r"^(\*\.)?[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")
_PATH = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*$")

Mode = Literal["connect", "tls", "plain"]


@dataclass(frozen=True, slots=True)
class IdentityRule:
    """Where an upstream's expected SPIFFE ID comes from."""

    source: Literal["gateway_ca", "consul_ca"]
    trust_domain: str
    """Ours: IDs found in Meta["spiffe_id"] must belong to it, so a service owner cannot claim a foreign ID."""
    consul_trust_domain: str | None = None
    namespace: str = "default"


def _str_map(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items() if isinstance(v, str | int | float | bool)}


def _usable_address(address: str) -> bool:
    """The address ends up in the upstream URL: only an IP address or a DNS name may get there."""
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return bool(_HOST.match(address.lower())) and not address.startswith("*")
    return True


def expected_identity(rule: IdentityRule, service: str, entry: Mapping[str, Any]) -> SpiffeId:
    svc, node = entry.get("Service") or {}, entry.get("Node") or {}
    if rule.source == "consul_ca":
        assert rule.consul_trust_domain is not None
        namespace = svc.get("Namespace") or rule.namespace
        datacenter = node.get("Datacenter") or ""
        return SpiffeId(rule.consul_trust_domain, f"/ns/{namespace}/dc/{datacenter}/svc/{service}")
    text = _str_map(svc.get("Meta")).get("spiffe_id")
    if not text:
        raise ValueError('no Meta["spiffe_id"]')
    spiffe_id = SpiffeId.parse(text)
    if not spiffe_id.member_of(rule.trust_domain):
        raise ValueError(f"Meta spiffe_id {text} is outside trust domain {rule.trust_domain}")
    return spiffe_id


def endpoint_from_entry(service: str, entry: Mapping[str, Any], mode: Mode, rule: IdentityRule) -> Endpoint:
    """One /v1/health/{service,connect} entry → an Endpoint; ValueError names what is wrong with it."""
    svc, node = entry.get("Service"), entry.get("Node")
    if not isinstance(svc, dict) or not isinstance(node, dict):
        raise ValueError("entry without Service or Node")
    address = svc.get("Address") or node.get("Address")
    port = svc.get("Port")
    if not isinstance(address, str) or not address or not isinstance(port, int) or isinstance(port, bool):
        raise ValueError("entry without a usable address and port")
    if not _usable_address(address):
        raise ValueError(f"address {address[:64]!r} is neither an IP address nor a host name")
    meta = (("consul.service_id", str(svc.get("ID", ""))), ("consul.node", str(node.get("Node", ""))))
    if mode == "connect":
        return Endpoint(address, port, expected_identity(rule, service, entry), "mtls", meta)
    spiffe_id = None
    if mode == "tls":
        try:
            spiffe_id = expected_identity(rule, service, entry)
        except ValueError:
            spiffe_id = None
    return Endpoint(address, port, spiffe_id, mode, meta)


def endpoints_from_entries(service: str, entries: Any, mode: Mode,
                           rule: IdentityRule) -> tuple[tuple[Endpoint, ...], list[str]]:
    """Healthy instances, sorted and de-duplicated so equal states compare equal; bad entries become warnings."""
    if not isinstance(entries, list):
        return (), [f"{service}: answer is not a list"]
    found: dict[str, Endpoint] = {}
    warnings = []
    for entry in entries:
        try:
            endpoint = endpoint_from_entry(service, entry if isinstance(entry, dict) else {}, mode, rule)
        except ValueError as exc:
            svc = entry.get("Service") if isinstance(entry, dict) else None
            service_id = svc.get("ID", "?") if isinstance(svc, dict) else "?"
            warnings.append(f"{service}: instance {service_id} skipped: {exc}")
            continue
        found.setdefault(endpoint.key, endpoint)
    return tuple(sorted(found.values(), key=lambda e: (e.address, e.port))), warnings


SIDECAR_SUFFIX = "-sidecar-proxy"
_SERVICE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


def tagged_services(services: Any) -> dict[str, tuple[str, ...]]:
    """/v1/catalog/services ({name: [tags]}) → the services that opted in with mesh-gateway.enable=true.

    A `sidecar_service` inherits its parent's tags under the name <parent>-sidecar-proxy; it is how we reach the
    parent, not a service of its own, so it gets no watch and no route. Names outside Consul's DNS-safe alphabet are
    ignored: they would end up in URLs and route names."""
    if not isinstance(services, dict):
        return {}
    return {name: tuple(t for t in tags if isinstance(t, str)) for name, tags in services.items()
            if isinstance(tags, list) and ENABLE_TAG in tags and not name.endswith(SIDECAR_SUFFIX)
            and _SERVICE_NAME.match(name)}


def route_from_tags(service: str, tags: Iterable[str]) -> Route:
    """Traefik-style: mesh-gateway.route.host=api.example.com, mesh-gateway.route.path_prefix=/api."""
    values: dict[str, str] = {}
    for tag in tags:
        if not tag.startswith(TAG_PREFIX) or tag == ENABLE_TAG:
            continue
        key, eq, value = tag[len(TAG_PREFIX):].partition("=")
        if not eq or key not in ROUTE_KEYS:
            raise ValueError(f"unknown tag {tag!r}")
        if key in values and values[key] != value:
            raise ValueError(f"conflicting values for {TAG_PREFIX}{key}")
        values[key] = value
    host = values.get("route.host", "*").lower()
    path = values.get("route.path_prefix", "/")
    if "route.host" not in values and "route.path_prefix" not in values:
        raise ValueError("needs mesh-gateway.route.host or mesh-gateway.route.path_prefix (a catch-all is refused)")
    if host != "*" and not _HOST.match(host):
        raise ValueError(f"invalid host {host!r}")
    if not _PATH.match(path) or "/../" in path + "/" or "/./" in path + "/":
        raise ValueError(f"invalid path_prefix {path!r}")
    return Route(name=f"consul.{service}", match=RouteMatch(host=host, path_kind="prefix", path=path),
                 service=service, source="consul")


def routes_from_catalog(tagged: Mapping[str, tuple[str, ...]]) -> tuple[tuple[Route, ...], dict[str, str]]:
    """Routes for tagged services, most specific first; invalid tag sets are returned as {service: reason}."""
    routes, invalid = [], {}
    for service, tags in tagged.items():
        try:
            routes.append(route_from_tags(service, tags))
        except ValueError as exc:
            invalid[service] = str(exc)
    routes.sort(key=lambda r: (r.match.host == "*", r.match.host.startswith("*."), -len(r.match.path), r.name))
    return tuple(routes), invalid
