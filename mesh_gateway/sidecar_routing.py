"""The sidecar's two request flows as values: pure functions from config and catalog to routes, the outbound
addressing scheme, and the inbound peer check. No I/O here.

Outbound addressing: the app calls `http://127.0.0.1:15001/<service>/<path>`; the sidecar routes on the first
path segment, strips it, and sends `/<path>` to one of the service's instances with `Host: <service>`.
"""

from __future__ import annotations

import dataclasses
import logging

from mesh_gateway.errors import NotFound
from mesh_gateway.model import (
    BodyPrefix,
    Catalog,
    Decision,
    Endpoint,
    EndpointSet,
    RequestInfo,
    Route,
    RouteMatch,
    RoutePolicy,
    RouteTable,
    SpiffeId,
)
from mesh_gateway.pipeline import Authorizer, Exchange
from mesh_gateway.sidecar_config import SidecarConfig

log = logging.getLogger("mesh_gateway.sidecar")

LOCAL = "local"
"""Catalog key of the application behind the sidecar in the inbound pipeline."""
INBOUND_ROUTE = "inbound"


def local_catalog(config: SidecarConfig) -> Catalog:
    app = config.service
    endpoint = Endpoint(address=app.address, port=app.port, tls="plain")
    return Catalog({LOCAL: EndpointSet(LOCAL, (endpoint,), source="local")})


def inbound_table(config: SidecarConfig) -> RouteTable:
    """Everything that passed the mTLS handshake goes to the local app, after the inbound policy."""
    policy = RoutePolicy(
        timeout_s=config.service.timeout_s,
        max_body_bytes=config.limits.max_body_bytes,
        retries=0,
        authz_enabled=True,
    )
    return RouteTable((Route(name=INBOUND_ROUTE, match=RouteMatch(), service=LOCAL, policy=policy,
                             source="sidecar"),))


def outbound_table(catalog: Catalog, *, timeout_s: float, retries: int, max_body_bytes: int) -> RouteTable:
    """One route per known mesh service, matched on the Host the outbound rewrite sets. Rebuilt whenever the
    catalog changes, so services that appear in discovery become callable without a restart."""
    # The destination sidecar authorizes; the caller's own sidecar only adds identity and mTLS.
    policy = RoutePolicy(timeout_s=timeout_s, retries=retries, max_body_bytes=max_body_bytes, authz_enabled=False)
    return RouteTable(tuple(
        Route(name=f"outbound.{name}", match=RouteMatch(host=name), service=name, policy=policy, source="sidecar")
        for name in sorted(catalog.services)
    ))


def service_addressing(info: RequestInfo) -> RequestInfo:
    """`/<service>/<rest>?q` → host `<service>`, path `/<rest>`, query kept. The first segment is lower-cased
    because service names are (DNS-label rules); the rest of the path is passed through untouched."""
    _, _, rest = info.path.partition("/")
    service, slash, tail = rest.partition("/")
    if not service:
        raise NotFound("outbound request without a service segment",
                       public_message="address mesh services as /<service>/<path>")
    return dataclasses.replace(info, host=service.lower(), path=slash + tail if slash else "/")


class PeerCheck:
    """Inbound: the caller must present an SVID of our trust domain (and be on `allowed_peers` when that is set)
    before the policy runs. Fail closed: no peer identity, no entry."""

    def __init__(self, trust_domain: str, allowed: tuple[SpiffeId, ...], policy: Authorizer | None) -> None:
        self._trust_domain = trust_domain
        self._allowed = frozenset(allowed)
        self._policy = policy

    async def check(self, info: RequestInfo, route: Route, exchange: Exchange,
                    body: BodyPrefix | None = None) -> Decision:
        peer = info.peer_spiffe_id
        if peer is None or not peer.member_of(self._trust_domain):
            log.info("inbound request %s refused: caller %s is not of trust domain %s", info.request_id, peer,
                     self._trust_domain)
            return Decision(allowed=False, http_status=403, engine="sidecar-peer-check")
        if self._allowed and peer not in self._allowed:
            log.info("inbound request %s refused: caller %s is not on inbound.allowed_peers", info.request_id, peer)
            return Decision(allowed=False, http_status=403, engine="sidecar-peer-check")
        if self._policy is None:
            return Decision(allowed=True, engine="sidecar-peer-check")
        if body is None:
            return await self._policy.check(info, route, exchange)
        return await self._policy.check(info, route, exchange, body)
