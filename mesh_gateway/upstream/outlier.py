"""Passive outlier ejection (Envoy's consecutive-5xx detector), pure with an injected clock.

An endpoint that fails `consecutive_failures` times in a row (connect error, reset, timeout or a 5xx answer) is
ejected for base_ejection_s * (times it has been ejected), capped at max_ejection_s. It returns on its own when
that time has passed; each base_ejection_s it then stays healthy forgives one past ejection. Never more than
max_ejection_percent of a service's current endpoints are ejected at once, so a bad deploy of the gateway's own
network cannot empty every set.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from mesh_gateway.config import Outlier
from mesh_gateway.model import Endpoint

log = logging.getLogger("mesh_gateway.upstream.outlier")


@dataclass(slots=True)
class HostState:
    consecutive_failures: int = 0
    ejections: int = 0
    ejected_until: float | None = None
    healthy_since: float = 0.0


@dataclass(frozen=True, slots=True)
class EjectionView:
    """What /clusters shows for one endpoint."""

    ejected: bool
    seconds_left: float
    ejections: int
    consecutive_failures: int


class OutlierDetector:
    def __init__(self, settings: Outlier, clock: Callable[[], float] = time.monotonic,
                 on_eject: Callable[[str], None] | None = None) -> None:
        self._settings = settings
        self._clock = clock
        self._on_eject = on_eject
        self._hosts: dict[tuple[str, str], HostState] = {}

    def _state(self, service: str, endpoint: Endpoint) -> HostState:
        key = (service, endpoint.key)
        state = self._hosts.get(key)
        if state is None:
            state = self._hosts[key] = HostState(healthy_since=self._clock())
        return state

    def _expire(self, state: HostState, now: float) -> None:
        if state.ejected_until is not None and now >= state.ejected_until:
            state.ejected_until = None
            state.healthy_since = now

    def usable(self, service: str, endpoint: Endpoint) -> bool:
        state = self._hosts.get((service, endpoint.key))
        if state is None:
            return True
        self._expire(state, self._clock())
        return state.ejected_until is None

    def ejected_count(self, service: str) -> int:
        now = self._clock()
        count = 0
        for (name, _), state in self._hosts.items():
            if name == service:
                self._expire(state, now)
                count += state.ejected_until is not None
        return count

    def success(self, service: str, endpoint: Endpoint) -> None:
        state = self._state(service, endpoint)
        now = self._clock()
        self._expire(state, now)
        state.consecutive_failures = 0
        if state.ejections and state.ejected_until is None and now - state.healthy_since >= \
                self._settings.base_ejection_s:
            state.ejections -= 1
            state.healthy_since = now

    def failure(self, service: str, endpoint: Endpoint, set_size: int) -> bool:
        """Count a failure; True when this one ejected the endpoint."""
        state = self._state(service, endpoint)
        now = self._clock()
        self._expire(state, now)
        if state.ejected_until is not None:
            return False
        state.consecutive_failures += 1
        if state.consecutive_failures < self._settings.consecutive_failures:
            return False
        allowed = set_size * self._settings.max_ejection_percent // 100
        if self.ejected_count(service) + 1 > allowed:
            log.warning("outlier: %s %s keeps failing but %d%% of %d endpoints are ejected already",
                        service, endpoint.key, self._settings.max_ejection_percent, set_size)
            return False
        state.ejections += 1
        state.consecutive_failures = 0
        duration = min(self._settings.base_ejection_s * state.ejections, self._settings.max_ejection_s)
        state.ejected_until = now + duration
        log.warning("outlier: ejected %s %s for %.0fs (ejection %d)", service, endpoint.key, duration,
                    state.ejections)
        if self._on_eject is not None:
            self._on_eject(service)
        return True

    def view(self, service: str, endpoint: Endpoint) -> EjectionView:
        state = self._hosts.get((service, endpoint.key))
        if state is None:
            return EjectionView(False, 0.0, 0, 0)
        now = self._clock()
        self._expire(state, now)
        left = (state.ejected_until - now) if state.ejected_until is not None else 0.0
        return EjectionView(state.ejected_until is not None, round(left, 3), state.ejections,
                            state.consecutive_failures)

    def forget_missing(self, service: str, keys: set[str]) -> None:
        """Drop state for endpoints that left the service, so the map stays bounded by what exists."""
        for key in [k for k in self._hosts if k[0] == service and k[1] not in keys]:
            del self._hosts[key]
