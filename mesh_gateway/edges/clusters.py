"""GET /clusters on the admin listener: every service, its endpoints, their health and ejection state, and for
Consul-discovered services the last index and how long ago Consul last answered (staleness during an outage)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from mesh_gateway.discovery.consul import CATALOG_KEY, ConsulWatcher, WatchState
from mesh_gateway.model import Catalog
from mesh_gateway.upstream.balancing import HealthAwarePicker
from mesh_gateway.upstream.circuit import Circuits
from mesh_gateway.upstream.outlier import OutlierDetector


def _watch_view(state: WatchState, now: float) -> dict[str, Any]:
    return {
        "index": state.index,
        "seconds_since_update": None if state.last_success is None else round(now - state.last_success, 3),
        "last_error": state.last_error,
        "consecutive_errors": state.errors,
        "acl_error": state.acl_error,
    }


def clusters_view(catalog: Catalog, *, outlier: OutlierDetector, picker: HealthAwarePicker, circuits: Circuits,
                  consul: ConsulWatcher | None, clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
    now = clock()
    states = consul.states() if consul is not None else {}
    names = sorted(set(catalog.services) | {k for k in states if k != CATALOG_KEY})
    services = []
    for name in names:
        endpoint_set = catalog.get(name)
        source = endpoint_set.source if endpoint_set is not None else "consul"
        endpoints = []
        for endpoint in endpoint_set.endpoints if endpoint_set is not None else ():
            ejection = outlier.view(name, endpoint)
            meta = dict(endpoint.meta)
            endpoints.append({
                "address": endpoint.address,
                "port": endpoint.port,
                "spiffe_id": str(endpoint.spiffe_id) if endpoint.spiffe_id else None,
                "tls": endpoint.tls,
                "health": "passing" if source == "consul" else "static",
                "ejected": ejection.ejected,
                "ejection_seconds_left": ejection.seconds_left,
                "ejections": ejection.ejections,
                "consecutive_failures": ejection.consecutive_failures,
                "consul_service_id": meta.get("consul.service_id"),
            })
        entry: dict[str, Any] = {"name": name, "source": source, "load_balancing": picker.policy(name),
                                 "circuit": circuits.view(name), "endpoints": endpoints}
        if name in states and source == "consul":
            entry["mode"] = consul.mode(name) if consul is not None else None
            entry["consul"] = _watch_view(states[name], now)
        services.append(entry)
    view: dict[str, Any] = {"services": services}
    if CATALOG_KEY in states:
        view["consul_catalog"] = _watch_view(states[CATALOG_KEY], now)
    return view
