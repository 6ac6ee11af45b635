"""PolicyAuthorizer: pipeline.Authorizer over an embedded or remote Rego evaluator, failing closed.

Outcomes, as Envoy ext_authz and OPA-Envoy define them:
- allow → the Decision (with any headers the policy adds or removes);
- deny → Decision(allowed=False) → 403, or the policy's `http_status` / `body` / `response_headers_to_add`;
- no decision (engine error, timeout, OPA down, undefined, malformed) → AuthzUnavailable (503), unless the route
  sets `failure_mode_allow`, which allows and logs it;
- dry-run (global or per route) → evaluates and logs what would have happened, then always allows.
A path that cannot be given one meaning (encoded `/`, backslash, bad escape) is refused with 400 before any
policy runs.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from mesh_gateway.authz.cache import CacheSettings, DecisionCache, cache_key
from mesh_gateway.authz.decision import DecisionError, parse_decision
from mesh_gateway.authz.decision_log import DecisionLog, DecisionRecord
from mesh_gateway.authz.input import build_input
from mesh_gateway.authz.rego import EngineError
from mesh_gateway.errors import AuthzUnavailable, BadRequest, Forbidden
from mesh_gateway.model import ALLOW_UNCHECKED, BodyPrefix, Decision, RequestInfo, Route, SpiffeId
from mesh_gateway.paths import UnsafePath, normalise_path

if TYPE_CHECKING:  # authz and pipeline are siblings; only the type is shared
    from mesh_gateway.pipeline import Exchange

log = logging.getLogger("mesh_gateway.authz")
DEFAULT_QUERY = "data.envoy.authz.allow"
# Decision ids: a random per-process prefix (74 random bits, UUID-shaped) and a counter, as edges/http.py makes request
# ids: unique without a getrandom() syscall per decision (uuid4 was ~4 % of a decision), and still UUID-shaped.
_DECISION_ID_PREFIX = str(uuid.uuid4())[:24]
_DECISION_COUNTER = itertools.count(1)


def new_decision_id() -> str:
    return f"{_DECISION_ID_PREFIX}{next(_DECISION_COUNTER):012x}"


class Evaluator(Protocol):
    name: str

    @property
    def revision(self) -> str: ...
    async def evaluate(self, query: str, document: dict[str, Any]) -> tuple[Any, str]: ...
    async def close(self) -> None: ...


def _headers_for_log(info: RequestInfo) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in info.headers:
        out[name] = f"{out[name]},{value}" if name in out else value
    return out


class PolicyAuthorizer:
    def __init__(self, evaluator: Evaluator, *, default_query: str = DEFAULT_QUERY,
                 gateway_id: Callable[[], SpiffeId | None] = lambda: None, dry_run: bool = False,
                 decision_log: DecisionLog | None = None, caches: Mapping[str, CacheSettings] | None = None,
                 wall: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.evaluator = evaluator
        self.default_query = default_query
        self._gateway_id = gateway_id
        self._dry_run = dry_run
        self._log = decision_log or DecisionLog("off")
        self._wall = wall
        self._caches = {name: DecisionCache(settings, monotonic) for name, settings in (caches or {}).items()}

    @property
    def decision_log(self) -> DecisionLog:
        return self._log

    def cache(self, route_name: str) -> DecisionCache | None:
        return self._caches.get(route_name)

    async def check(self, info: RequestInfo, route: Route, exchange: Exchange,
                    body: BodyPrefix | None = None) -> Decision:
        policy = route.policy
        if not policy.authz_enabled:
            return ALLOW_UNCHECKED
        query = policy.authz_query or self.default_query
        dry_run = self._dry_run or policy.authz_dry_run
        evaluator = self.evaluator
        revision = evaluator.revision
        record = _Recorder(self, info, route, exchange, query, revision, dry_run)
        try:
            normalised = normalise_path(info.path)
        except UnsafePath as exc:
            record.path = info.path
            record.write("deny", BadRequest.status, str(exc), new_decision_id())
            raise BadRequest(str(exc), public_message="ambiguous request path") from None
        record.path = normalised.path
        cache = self._caches.get(route.name)
        key = None
        if cache is not None:
            key = cache_key(info, route.name, normalised.path, revision, query, cache.settings.headers)
            hit = cache.get(key)
            if hit is not None:
                return record.finish(dataclasses.replace(hit, decision_id=new_decision_id()), cached=True)
        document = build_input(info, route, normalised=normalised, now=self._wall(), gateway_id=self._gateway_id(),
                               body=body)
        try:
            value, remote_id = await evaluator.evaluate(query, document)
            decision = parse_decision(value, decision_id=remote_id or new_decision_id(), policy_revision=revision,
                                      engine=evaluator.name)
        except (EngineError, DecisionError) as exc:
            return record.fail(exc, policy.authz_failure_mode_allow)
        if cache is not None and key is not None:
            cache.put(key, decision)
        return record.finish(decision)

    async def close(self) -> None:
        await self.evaluator.close()
        self._log.close()


class _Recorder:
    """Turns one check's outcome into the returned Decision and its decision-log line."""

    __slots__ = ("dry_run", "exchange", "info", "owner", "path", "query", "revision", "route", "started")

    def __init__(self, owner: PolicyAuthorizer, info: RequestInfo, route: Route, exchange: Exchange, query: str,
                 revision: str, dry_run: bool) -> None:
        self.owner = owner
        self.info = info
        self.route = route
        self.exchange = exchange
        self.query = query
        self.revision = revision
        self.dry_run = dry_run
        # Only the log line's duration_us needs the start time.
        self.started = time.perf_counter() if owner._log.enabled else 0.0
        self.path = info.path

    def write(self, result: str, status: int, reason: str, decision_id: str, cached: bool = False) -> None:
        if not self.owner._log.enabled:
            return  # no record (headers merged, ids formatted) for a log that is off
        principal = self.info.peer_spiffe_id
        self.owner._log.write(DecisionRecord(
            decision_id=decision_id, route=self.route.name, principal=str(principal) if principal else "",
            method=self.info.method, path=self.path, result=result, http_status=status,
            duration_us=int((time.perf_counter() - self.started) * 1e6), revision=self.revision,
            engine=self.owner.evaluator.name, query=self.query, dry_run=self.dry_run,
            trace_id=self.exchange.span.trace_id, span_id=self.exchange.span.span_id,
            headers=_headers_for_log(self.info), reason=reason, cached=cached,
        ))

    def finish(self, decision: Decision, cached: bool = False) -> Decision:
        status = 200 if decision.allowed else decision.http_status or Forbidden.status
        self.write("allow" if decision.allowed else "deny", status, "", decision.decision_id, cached)
        if self.dry_run:
            return Decision(allowed=True, decision_id=decision.decision_id, policy_revision=decision.policy_revision,
                            engine=decision.engine, dry_run=True)
        return decision

    def fail(self, exc: Exception, failure_mode_allow: bool) -> Decision:
        decision_id = new_decision_id()
        reason = f"{type(exc).__name__}: {exc}"
        engine = self.owner.evaluator.name
        if self.dry_run or failure_mode_allow:
            why = "dry-run" if self.dry_run else "failure_mode_allow"
            self.write("error", 200, f"{reason} (allowed by {why})", decision_id)
            log.warning("authorization failed on route %s, allowed by %s: %s", self.route.name, why, reason)
            return Decision(allowed=True, decision_id=decision_id, policy_revision=self.revision, engine=engine,
                            dry_run=self.dry_run)
        self.write("error", AuthzUnavailable.status, reason, decision_id)
        raise AuthzUnavailable(reason)
