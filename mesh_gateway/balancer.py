"""Choosing an endpoint. Pure apart from the counters each policy keeps per service."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from mesh_gateway.errors import NoHealthyUpstream
from mesh_gateway.model import Endpoint, EndpointSet


class RoundRobin:
    """Round-robin over the current snapshot; the cursor survives snapshot swaps."""

    __slots__ = ("_cursor",)

    def __init__(self) -> None:
        self._cursor: dict[str, int] = {}

    def pick(self, endpoints: EndpointSet | None, usable: Callable[[Endpoint], bool] | None = None,
             rng: random.Random | None = None) -> Endpoint:
        candidates = _candidates(endpoints, usable)
        index = self._cursor.get(endpoints.service if endpoints else "", -1) + 1
        if endpoints is not None:
            self._cursor[endpoints.service] = index % len(candidates)
        return candidates[index % len(candidates)]


class LeastRequest:
    """Power of two choices on in-flight requests (Envoy's LEAST_REQUEST)."""

    __slots__ = ("_active", "_rng")

    def __init__(self, rng: random.Random | None = None) -> None:
        self._active: dict[str, int] = {}
        self._rng = rng or random.Random()

    def pick(self, endpoints: EndpointSet | None, usable: Callable[[Endpoint], bool] | None = None,
             rng: random.Random | None = None) -> Endpoint:
        candidates = _candidates(endpoints, usable)
        if len(candidates) == 1:
            return candidates[0]
        a, b = (rng or self._rng).sample(range(len(candidates)), 2)
        first, second = candidates[a], candidates[b]
        return first if self._active.get(first.key, 0) <= self._active.get(second.key, 0) else second

    def started(self, endpoint: Endpoint) -> None:
        self._active[endpoint.key] = self._active.get(endpoint.key, 0) + 1

    def finished(self, endpoint: Endpoint) -> None:
        self._active[endpoint.key] = max(0, self._active.get(endpoint.key, 0) - 1)


def _candidates(endpoints: EndpointSet | None, usable: Callable[[Endpoint], bool] | None) -> Sequence[Endpoint]:
    if endpoints is None or not endpoints.endpoints:
        raise NoHealthyUpstream("service has no endpoints")
    candidates: Sequence[Endpoint] = endpoints.endpoints
    if usable is not None:
        candidates = [e for e in candidates if usable(e)]
        if not candidates:
            raise NoHealthyUpstream("every endpoint is ejected or unusable")
    return candidates
