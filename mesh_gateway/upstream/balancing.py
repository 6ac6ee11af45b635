"""The EndpointPicker the pipeline uses: per-service policy (round-robin or least-request P2C) over the endpoints
that are not ejected by the outlier detector."""

from __future__ import annotations

import random
from collections.abc import Callable

from mesh_gateway.balancer import LeastRequest, RoundRobin
from mesh_gateway.config import Resilience
from mesh_gateway.errors import NoHealthyUpstream
from mesh_gateway.model import Catalog, Endpoint, EndpointSet, Route, TlsMode
from mesh_gateway.pipeline import Exchange
from mesh_gateway.upstream.outlier import OutlierDetector

STRENGTH: dict[TlsMode, int] = {"plain": 0, "tls": 1, "mtls": 2}


class HealthAwarePicker:
    def __init__(self, settings: Resilience, outlier: OutlierDetector, rng: random.Random | None = None) -> None:
        self._settings = settings
        self._outlier = outlier
        self._round_robin = RoundRobin()
        self._least = LeastRequest(rng)
        self._catalog: Catalog | None = None

    def policy(self, service: str) -> str:
        per_service = self._settings.services.get(service)
        if per_service is not None and per_service.load_balancing is not None:
            return per_service.load_balancing
        return self._settings.load_balancing

    def _forget_departed(self, catalog: Catalog) -> None:
        if catalog is self._catalog:
            return
        self._catalog = catalog
        for name, endpoints in catalog.services.items():
            self._outlier.forget_missing(name, {e.key for e in endpoints.endpoints})

    def pick(self, route: Route, catalog: Catalog, exchange: Exchange) -> Endpoint:
        self._forget_departed(catalog)
        return self.pick_from(catalog.get(route.service), route)

    def pick_from(self, endpoints: EndpointSet | None, route: Route, avoid: frozenset[str] = frozenset()) -> Endpoint:
        """Pick, preferring endpoints not in `avoid` (already tried by this request) when any other is usable."""
        if endpoints is None:
            raise NoHealthyUpstream("service has no endpoints")
        service = endpoints.service
        # Discovered endpoints are only as trusted as the route allows: a service that registered itself for
        # plaintext must not downgrade a route that expects mTLS.
        floor = STRENGTH[route.policy.upstream_security] if endpoints.source == "consul" else 0

        def usable(endpoint: Endpoint) -> bool:
            return STRENGTH[endpoint.tls] >= floor and self._outlier.usable(service, endpoint)

        policy = route.policy.load_balancing or self.policy(service)
        choose: Callable[..., Endpoint] = self._least.pick if policy == "least_request" else self._round_robin.pick
        if avoid:
            try:
                return choose(endpoints, lambda e: e.key not in avoid and usable(e))
            except NoHealthyUpstream:
                pass
        return choose(endpoints, usable)

    def started(self, endpoint: Endpoint) -> None:
        self._least.started(endpoint)

    def finished(self, endpoint: Endpoint) -> None:
        self._least.finished(endpoint)
