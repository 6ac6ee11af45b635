"""From the `authz:` config section to a running PolicyAuthorizer (called by app.py on the loop thread)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mesh_gateway.authz.authorizer import Evaluator, PolicyAuthorizer
from mesh_gateway.authz.cache import CacheSettings
from mesh_gateway.authz.decision_log import DecisionLog
from mesh_gateway.authz.opa import OpaClient
from mesh_gateway.authz.rego import EmbeddedEngine
from mesh_gateway.config import Authz, GatewayConfig
from mesh_gateway.model import SpiffeId

log = logging.getLogger("mesh_gateway.authz")


@dataclass(slots=True)
class BuiltAuthz:
    authorizer: PolicyAuthorizer
    embedded: EmbeddedEngine | None
    """Set for the embedded engine: app.py runs `embedded.watch()` as a background task."""

    def view(self) -> dict[str, Any]:
        """The admin `/policies` view: what serves now and the last rejected change."""
        evaluator = self.authorizer.evaluator
        out: dict[str, Any] = {"engine": evaluator.name, "query": self.authorizer.default_query}
        if self.embedded is None:
            return out
        state = self.embedded.state.get()
        out.update({
            "directory": state.root,
            "revision": state.revision,
            "loaded_at": _iso(state.loaded_at),
            "files": state.files,
            "last_error": state.last_error or None,
            "last_error_at": _iso(state.last_error_at) if state.last_error else None,
        })
        return out


def _iso(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, UTC).isoformat(timespec="seconds")


def _queries(config: GatewayConfig, authz: Authz) -> tuple[str, ...]:
    queries = [authz.query] + [r.authz.query for r in config.routes if r.authz.query and not r.authz.disabled]
    return tuple(dict.fromkeys(queries))


def build(config: GatewayConfig, gateway_id: Callable[[], SpiffeId | None]) -> BuiltAuthz | None:
    """None when authorization is off (no `authz:` section, or `engine: none`). Raises PolicyError when the
    embedded policy set cannot be loaded: the gateway refuses to start rather than serve without a policy."""
    authz = config.authz
    if authz is None or authz.engine == "none":
        return None  # app.py warns that authorization is off
    for route in config.routes:
        if route.authz.disabled:
            log.warning("authorization disabled on route %s", route.name)
        if route.authz.failure_mode_allow:
            log.warning("route %s allows requests when authorization fails (failure_mode_allow)", route.name)
    caches = {r.name: CacheSettings(r.authz.cache.ttl_s, r.authz.cache.max_entries, r.authz.cache.headers)
              for r in config.routes if r.authz.cache is not None}
    return build_from_section(authz, gateway_id, queries=_queries(config, authz), caches=caches)


def build_from_section(authz: Authz, gateway_id: Callable[[], SpiffeId | None], *, queries: tuple[str, ...],
                       caches: dict[str, CacheSettings] | None = None) -> BuiltAuthz:
    """The authorizer for one `authz:` section; `queries` are probed when the policy set loads. The sidecar
    (which has no route table in its config) calls this directly."""
    embedded: EmbeddedEngine | None = None
    evaluator: Evaluator
    if authz.engine == "embedded":
        embedded = EmbeddedEngine(authz.policies, rego_v0=authz.rego_version == "v0",
                                  probe_queries=queries, poll_s=authz.reload_poll_s, memoise=authz.memoise)
        embedded.load()
        evaluator = embedded
    else:
        assert authz.opa is not None  # enforced by the config model
        evaluator = OpaClient(authz.opa.url, timeout_s=authz.opa.timeout_ms / 1000, ca_file=authz.opa.ca_file,
                              pool_size=authz.opa.pool_size)
    decision_log = DecisionLog(authz.decision_log.sink, redact_headers=authz.decision_log.redact_headers)
    authorizer = PolicyAuthorizer(evaluator, default_query=authz.query, gateway_id=gateway_id,
                                  dry_run=authz.dry_run, decision_log=decision_log, caches=caches or {})
    return BuiltAuthz(authorizer, embedded)
