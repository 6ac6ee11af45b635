"""The Consul watcher: one blocking query per watched service (+ one on the service list), whole snapshots out.

Every loop follows discovery/blocking.py's rules. What reaches the gateway is a `Watch[Catalog]` (static services
merged with discovered ones; static wins on a name clash) and a `Watch` of tag-driven routes.

Last known good: an error, a timeout, an outage, an ACL refusal or a *transient* empty answer never replaces a
service's last good endpoint set. Transient means: filtered by ACLs, read from a server without a leader, or
answered at or below the index we had to reset to after the index went backwards (a restored snapshot). An empty
answer at a newer index — the last instance was deregistered or failed its checks — does empty the set.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from urllib.parse import quote

from mesh_gateway.discovery.blocking import Backoff, TokenBucket, advance, client_timeout_s, wait_param
from mesh_gateway.discovery.consul_client import ConsulAclError, ConsulAnswer, ConsulClient, ConsulError
from mesh_gateway.discovery.consul_entries import (
    IdentityRule,
    Mode,
    endpoints_from_entries,
    routes_from_catalog,
    tagged_services,
)
from mesh_gateway.model import Catalog, EndpointSet, Route
from mesh_gateway.watch import Watch

log = logging.getLogger("mesh_gateway.discovery.consul")

CATALOG_KEY = "(catalog)"
"""The status key of the /v1/catalog/services loop."""

Sleep = Callable[[float], Awaitable[None]]
AnswerHandler = Callable[[ConsulAnswer, bool], None]


@dataclass(frozen=True, slots=True)
class WatchState:
    """What /clusters shows about one blocking-query loop."""

    index: int = 0
    last_success: float | None = None
    last_error: str | None = None
    errors: int = 0
    acl_error: bool = False


class ConsulWatcher:
    def __init__(self, client: ConsulClient, *, trust_domain: str, static: Catalog | None = None,
                 clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None,
                 sleep: Sleep = asyncio.sleep) -> None:
        settings = client.settings
        self._client = client
        self._settings = settings
        self._static = static or Catalog()
        self._clock = clock
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._rule = IdentityRule(settings.identity_source, trust_domain, settings.consul_trust_domain,
                                  settings.namespace)
        self._explicit: dict[str, Mode] = {s.name: s.mode for s in settings.services}
        self.catalog: Watch[Catalog] = Watch(self._static)
        self.routes: Watch[tuple[Route, ...]] = Watch(())
        self._sets: dict[str, EndpointSet] = {}
        self._states: dict[str, WatchState] = {}
        self._tagged: dict[str, tuple[str, ...]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._warned: dict[str, str] = {}
        self._group: asyncio.TaskGroup | None = None

    def states(self) -> Mapping[str, WatchState]:
        return dict(self._states)

    def not_synced(self) -> str | None:
        """Readiness: not ready until Consul answered once for each configured service and the service list.
        After that, outages do not matter here: the gateway serves its last known endpoints."""
        keys = [*self._explicit, *([CATALOG_KEY] if self._settings.watch_tagged else [])]
        waiting = [k for k in keys if self._states.get(k, WatchState()).last_success is None]
        return f"consul: no answer yet for {', '.join(waiting)}" if waiting else None

    def mode(self, service: str) -> Mode | None:
        return self._explicit.get(service) or ("connect" if service in self._tagged else None)

    async def run(self) -> None:
        """Runs until cancelled; never raises for Consul's trouble (that is logged and shown in /clusters)."""
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                for name in self._explicit:
                    self._start(name)
                if self._settings.watch_tagged:
                    self._states[CATALOG_KEY] = WatchState()
                    group.create_task(self._loop(CATALOG_KEY, "/v1/catalog/services", {}, self._catalog_answer))
                # Keep the group open even when nothing is watched yet: tagged services may start later.
                await asyncio.Event().wait()
        finally:
            self._group = None
            await self._client.close()

    # ---- per-service watchers ------------------------------------------------------------------------------------
    def _start(self, name: str) -> None:
        if name in self._tasks or self._group is None:
            return
        mode = self.mode(name) or "connect"
        quoted = quote(name, safe="")
        path = f"/v1/health/connect/{quoted}" if mode == "connect" else f"/v1/health/service/{quoted}"
        self._states.setdefault(name, WatchState())

        def on_answer(answer: ConsulAnswer, may_empty: bool) -> None:
            self._service_answer(name, mode, answer, may_empty)

        self._tasks[name] = self._group.create_task(self._loop(name, path, {"passing": "1"}, on_answer),
                                                    name=f"consul-watch-{name}")

    def _stop(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()
        self._sets.pop(name, None)
        self._states.pop(name, None)

    def _service_answer(self, name: str, mode: Mode, answer: ConsulAnswer, may_empty: bool) -> None:
        endpoints, warnings = endpoints_from_entries(name, answer.body, mode, self._rule)
        for warning in warnings:
            log.warning("consul: %s", warning)
        previous = self._sets.get(name)
        if not endpoints and previous is not None and previous.endpoints:
            reason = self._distrust(answer, may_empty)
            if reason is not None:
                log.warning("consul: %s: empty answer ignored (%s); keeping %d last known endpoints",
                            name, reason, len(previous.endpoints))
                return
        self._sets[name] = EndpointSet(name, endpoints, source="consul")
        self._publish_catalog()

    @staticmethod
    def _distrust(answer: ConsulAnswer, may_empty: bool) -> str | None:
        if answer.filtered_by_acls:
            return "filtered by ACLs"
        if not answer.known_leader:
            return "stale read from a server without a leader"
        if not may_empty:
            return "index went backwards; waiting for a newer index"
        return None

    def _publish_catalog(self) -> None:
        services = {name: s for name, s in self._sets.items()}
        services.update(self._static.services)
        self.catalog.publish(Catalog(services))

    # ---- the service list and tag-driven routes ----------------------------------------------------------------
    def _catalog_answer(self, answer: ConsulAnswer, may_empty: bool) -> None:
        tagged = tagged_services(answer.body)
        gone = set(self._tagged) - set(tagged)
        if gone and (answer.filtered_by_acls or not may_empty or not answer.known_leader):
            # Never drop services on an answer we cannot trust; add the new ones only.
            log.warning("consul: service list shrank on an untrusted answer (%s); keeping %s",
                        self._distrust(answer, may_empty) or "filtered", ", ".join(sorted(gone)))
            tagged = {**{n: self._tagged[n] for n in gone}, **tagged}
        self._tagged = tagged
        for name in list(self._tasks):
            if name not in tagged and name not in self._explicit:
                self._stop(name)
        for name in tagged:
            self._start(name)
        routes, invalid = routes_from_catalog(tagged)
        for service, reason in invalid.items():
            if self._warned.get(service) != reason:
                log.warning("consul: service %s: tags give no valid route, skipped: %s", service, reason)
        self._warned = invalid
        self.routes.publish(routes)
        self._publish_catalog()

    # ---- the blocking-query loop -----------------------------------------------------------------------------
    async def _loop(self, key: str, path: str, params: dict[str, str], on_answer: AnswerHandler) -> None:
        settings = self._settings
        bucket = TokenBucket(settings.rate_limit_per_s, 2, self._clock)
        backoff = Backoff(settings.retry_base_s, settings.retry_max_s, self._rng)
        index = 0
        reset_floor = 0
        while True:
            delay = bucket.delay()
            if delay > 0:
                await self._sleep(delay)
            query = dict(params)
            if index > 0:
                query.update(index=str(index), wait=wait_param(settings.wait_s))
            try:
                answer = await self._client.get(path, query, timeout_s=client_timeout_s(settings.wait_s))
            except ConsulAclError as exc:
                self._acl_refused(key, str(exc))
                await self._sleep(backoff.next())
                continue
            except ConsulError as exc:
                self._failed(key, str(exc))
                await self._sleep(backoff.next())
                continue
            if answer.filtered_by_acls and not answer.body:
                # Consul hides what the token may not read instead of refusing: an ACL problem, not an empty service.
                self._acl_refused(key, "every result was filtered by ACLs (the token lacks service:read)")
                await self._sleep(backoff.next())
                continue
            backoff.reset()
            step = advance(index, answer.index)
            if step.reset:
                log.warning("consul: %s: X-Consul-Index went backwards (%d → %d); re-reading from scratch",
                            key, index, answer.index)
                reset_floor = max(answer.index, 1)
            index = step.next_index
            self._states[key] = WatchState(index=answer.index, last_success=self._clock())
            if step.changed:
                on_answer(answer, answer.index > reset_floor)

    def _failed(self, key: str, message: str) -> None:
        state = self._states.get(key, WatchState())
        state = replace(state, last_error=message, errors=state.errors + 1, acl_error=False)
        self._states[key] = state
        if state.errors & (state.errors - 1) == 0:  # 1st, 2nd, 4th, 8th… failure: visible, not a flood
            log.warning("consul: %s: %s (failure %d; serving last known endpoints)", key, message, state.errors)

    def _acl_refused(self, key: str, message: str) -> None:
        state = self._states.get(key, WatchState())
        state = replace(state, last_error=message, errors=state.errors + 1, acl_error=True)
        self._states[key] = state
        if state.errors & (state.errors - 1) == 0:
            log.error("consul: ACL token refused while watching %s: %s. Check discovery.consul.token/token_file "
                      "and that its policy grants service:read and node:read; serving last known endpoints",
                      key, message)
