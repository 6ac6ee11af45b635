"""From the `authz:` config section to a running PolicyAuthorizer (called by app.py on the loop thread)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

from mesh_gateway.authz.authorizer import Evaluator, PolicyAuthorizer
from mesh_gateway.authz.cache import CacheSettings
from mesh_gateway.authz.decision_log import DecisionLog
from mesh_gateway.authz.opa import OpaClient
from mesh_gateway.authz.rego import EmbeddedEngine
from mesh_gateway.config import Authz, GatewayConfig
from mesh_gateway.config import Route as RouteConfig
from mesh_gateway.model import RoutePolicy, SpiffeId

log = logging.getLogger("mesh_gateway.authz")


@dataclass(slots=True)
class BuiltAuthz:
    authorizer: PolicyAuthorizer
    embedded: EmbeddedEngine | None
    """Set for the embedded engine: app.py runs `embedded.watch()` as a background task."""


def apply_route_authz(policy: RoutePolicy, route: RouteConfig) -> RoutePolicy:
    """A route's `authz:` block onto its RoutePolicy (app.py's config → RoutePolicy mapping calls this)."""
    options = route.authz
    return replace(policy, authz_enabled=not options.disabled, authz_failure_mode_allow=options.failure_mode_allow,
                   authz_dry_run=options.dry_run, authz_query=options.query,
                   authz_include_body_bytes=options.include_body_bytes)


def _queries(config: GatewayConfig, authz: Authz) -> tuple[str, ...]:
    queries = [authz.query] + [r.authz.query for r in config.routes if r.authz.query and not r.authz.disabled]
    return tuple(dict.fromkeys(queries))


def build(config: GatewayConfig, gateway_id: Callable[[], SpiffeId | None]) -> BuiltAuthz | None:
    """None when authorization is off (no `authz:` section, or `engine: none`). Raises PolicyError when the
    embedded policy set cannot be loaded: the gateway refuses to start rather than serve without a policy."""
    authz = config.authz
    if authz is None or authz.engine == "none":
        log.warning("authorization is OFF: every routed request is forwarded without a policy decision")
        return None
    for route in config.routes:
        if route.authz.disabled:
            log.warning("authorization disabled on route %s", route.name)
        if route.authz.failure_mode_allow:
            log.warning("route %s allows requests when authorization fails (failure_mode_allow)", route.name)
    embedded: EmbeddedEngine | None = None
    evaluator: Evaluator
    if authz.engine == "embedded":
        embedded = EmbeddedEngine(authz.policies, rego_v0=authz.rego_version == "v0",
                                  probe_queries=_queries(config, authz), poll_s=authz.reload_poll_s)
        embedded.load()
        evaluator = embedded
    else:
        assert authz.opa is not None  # enforced by the config model
        evaluator = OpaClient(authz.opa.url, timeout_s=authz.opa.timeout_ms / 1000, ca_file=authz.opa.ca_file,
                              pool_size=authz.opa.pool_size)
    caches = {r.name: CacheSettings(r.authz.cache.ttl_s, r.authz.cache.max_entries, r.authz.cache.headers)
              for r in config.routes if r.authz.cache is not None}
    decision_log = DecisionLog(authz.decision_log.sink, redact_headers=authz.decision_log.redact_headers)
    authorizer = PolicyAuthorizer(evaluator, default_query=authz.query, gateway_id=gateway_id,
                                  dry_run=authz.dry_run, decision_log=decision_log, caches=caches)
    return BuiltAuthz(authorizer, embedded)
