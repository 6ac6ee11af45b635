"""A fake Consul agent: a real aiohttp server speaking Consul's HTTP API, written from Consul's API docs.

Covered: /v1/health/service/<name> and /v1/health/connect/<name> (passing, dc, stale, index/wait blocking),
/v1/catalog/services, /v1/agent/service/register|deregister, /v1/agent/check/pass|warn|fail|update, ACL tokens
(X-Consul-Token: unknown → 403 "ACL not found", missing rights → 403 "Permission denied" or results filtered with
X-Consul-Results-Filtered-By-ACLs), sidecar_service registration with an alias check, TTL and HTTP checks that
really run. Faults: 5xx answers, hanging requests, snapshot restore (index goes back, blocked queries
abandoned), a cluster without a leader (only stale reads served)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp
from aiohttp import web

from tests.fakes.consul_model import (
    DEFAULT_WAIT_S,
    MAX_WAIT_S,
    Check,
    Instance,
    Policy,
    Seen,
    bearer,
    denied,
    get_ci,
    health_entry,
    parse_go_duration,
)


class FakeConsul:
    def __init__(self, *, datacenter: str = "dc1", node: str = "node-1", node_address: str = "127.0.0.1",
                 tokens: dict[str, Policy] | None = None, anonymous: Policy | None = None) -> None:
        self.datacenter, self.node, self.node_address = datacenter, node, node_address
        self.node_id = str(uuid.UUID(int=random.getrandbits(128)))
        self.acl = tokens is not None
        self.tokens = tokens or {}
        self.anonymous = anonymous or Policy()
        self.index = 0
        self.instances: dict[str, Instance] = {}
        self.checks: dict[str, Check] = {}
        self.seen: list[Seen] = []
        self._touched: dict[str, int] = {}
        self._changed = asyncio.Event()
        self._abandoned = 0
        self._closing = False
        self._fail_status: int | None = None
        self._fail_left: int | None = None
        self._hang = asyncio.Event()
        self._hang.set()
        self.leader = True
        self._sidecar_ports = iter(range(21000, 21255))
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None
        self.url = ""

    # ---- lifecycle -------------------------------------------------------------------------------------------
    async def start(self, ssl_context: Any = None) -> str:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/v1/health/service/{name}", self._health_service)
        app.router.add_get("/v1/health/connect/{name}", self._health_connect)
        app.router.add_get("/v1/catalog/services", self._catalog_services)
        app.router.add_put("/v1/agent/service/register", self._agent_register)
        app.router.add_put("/v1/agent/service/deregister/{id}", self._agent_deregister)
        app.router.add_put("/v1/agent/check/{verb:pass|warn|fail}/{id}", self._agent_check_verb)
        app.router.add_put("/v1/agent/check/update/{id}", self._agent_check_update)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"
        return self.url

    async def close(self) -> None:
        self._closing = True
        self._changed.set()
        self._hang.set()
        for check in self.checks.values():
            self._stop_check(check)
        if self._http is not None:
            await self._http.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # ---- state changes (tests call these directly or through the agent API) ----------------------------------
    def _bump(self, *services: str) -> int:
        self.index += 1
        for name in services:
            self._touched[name] = self.index
        self._changed.set()
        self._changed = asyncio.Event()
        return self.index

    def register(self, name: str, port: int, *, service_id: str | None = None, address: str = "",
                 tags: Iterable[str] = (), meta: dict[str, str] | None = None, kind: str = "",
                 proxy: dict[str, Any] | None = None, native: bool = False,
                 checks: Iterable[dict[str, Any]] = (), status: str | None = None) -> Instance:
        """Register (or replace) a service instance; `status` adds a TTL check already in that state."""
        service_id = service_id or name
        if service_id in self.instances:
            self._drop(service_id)
        destination = (proxy or {}).get("DestinationServiceName", "")
        index = self._bump(name, f"connect:{destination or name}")
        inst = Instance(service_id, name, address, port, list(tags), dict(meta or {}), kind, dict(proxy or {}),
                        native, index, index)
        self.instances[service_id] = inst
        definitions = list(checks)
        if status is not None:
            definitions.append({"TTL": "1h", "Status": status})
        for n, definition in enumerate(definitions, start=1):
            check_id = get_ci(definition, "CheckID") or (f"service:{service_id}" if len(definitions) == 1
                                                       else f"service:{service_id}:{n}")
            self._add_check(inst, check_id, definition)
        return inst

    def _add_check(self, inst: Instance, check_id: str, definition: dict[str, Any]) -> None:
        ttl, http = get_ci(definition, "TTL"), get_ci(definition, "HTTP")
        alias = get_ci(definition, "AliasService")
        check = Check(check_id, get_ci(definition, "Name") or f"Service '{inst.name}' check", inst.service_id,
                      status=get_ci(definition, "Status") or ("passing" if alias else "critical"),
                      kind="ttl" if ttl else "http" if http else "alias" if alias else "",
                      ttl_s=parse_go_duration(ttl) if ttl else None, http=http,
                      interval_s=parse_go_duration(get_ci(definition, "Interval") or "10s"),
                      alias_service=alias, modify_index=self.index)
        self.checks[check_id] = check
        loop = asyncio.get_running_loop()
        if check.ttl_s is not None:
            check.timer = loop.call_later(check.ttl_s, self._ttl_expired, check_id)
        if check.http is not None:
            check.task = loop.create_task(self._run_http_check(check))

    def deregister(self, service_id: str) -> None:
        inst = self.instances.get(service_id)
        if inst is None:
            raise KeyError(service_id)
        self._drop(service_id)
        for sidecar in [i for i in self.instances.values() if i.proxy.get("DestinationServiceID") == service_id]:
            self._drop(sidecar.service_id)
        self._bump(inst.name, f"connect:{inst.proxy.get('DestinationServiceName') or inst.name}")

    def _drop(self, service_id: str) -> None:
        self.instances.pop(service_id, None)
        for check_id in [c.check_id for c in self.checks.values() if c.service_id == service_id]:
            self._stop_check(self.checks.pop(check_id))

    def set_status(self, check_id: str, status: str, output: str = "") -> None:
        check = self.checks[check_id]
        if (check.status, check.output) == (status, output):
            return
        check.status, check.output = status, output
        inst = self.instances[check.service_id]
        names = [inst.name, f"connect:{inst.name}"]
        if inst.proxy.get("DestinationServiceName"):
            # A proxy's own check changes what /v1/health/connect/<destination> answers.
            names.append(f"connect:{inst.proxy['DestinationServiceName']}")
        for sidecar in self.instances.values():
            if sidecar.proxy.get("DestinationServiceID") == inst.service_id:
                names += [sidecar.name]
        check.modify_index = self._bump(*names)

    def _ttl_expired(self, check_id: str) -> None:
        if check_id in self.checks:
            self.set_status(check_id, "critical", "TTL expired")

    async def _run_http_check(self, check: Check) -> None:
        """Consul's HTTP check: 2xx passing, 429 warning, anything else critical."""
        if self._http is None:
            self._http = aiohttp.ClientSession()
        while True:
            try:
                async with self._http.get(check.http or "", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    status = "passing" if 200 <= resp.status < 300 else "warning" if resp.status == 429 \
                        else "critical"
                    self.set_status(check.check_id, status, f"HTTP GET: {resp.status}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.set_status(check.check_id, "critical", f"HTTP GET failed: {exc}")
            await asyncio.sleep(check.interval_s)

    @staticmethod
    def _stop_check(check: Check) -> None:
        if check.timer is not None:
            check.timer.cancel()
        if check.task is not None:
            check.task.cancel()

    # ---- fault injection -------------------------------------------------------------------------------------
    def fail(self, status: int = 500, times: int | None = None) -> None:
        """Answer the next `times` requests (or all, until heal) with `status`."""
        self._fail_status, self._fail_left = status, times

    def hang(self) -> None:
        """Hold every request open until heal() (a partitioned or overloaded agent)."""
        self._hang.clear()

    def heal(self) -> None:
        self._fail_status = self._fail_left = None
        self._hang.set()

    def restore_snapshot(self, index: int, *, without: Iterable[str] = ()) -> None:
        """A snapshot restore: the raft index goes back, the state becomes the snapshot's (here: the current one
        minus the service IDs in `without`), and blocked queries are abandoned (answered at once)."""
        for service_id in without:
            self._drop(service_id)
        self.index = index
        self._touched = {k: min(v, index) for k, v in self._touched.items()}
        self._abandoned += 1
        self._changed.set()
        self._changed = asyncio.Event()

    # ---- HTTP ------------------------------------------------------------------------------------------------
    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
        token = request.headers.get("X-Consul-Token") or bearer(request) or request.query.get("token")
        self.seen.append(Seen(request.method, request.path, dict(request.query), token))
        await self._hang.wait()
        if self._fail_status is not None:
            if self._fail_left is not None:
                self._fail_left -= 1
                if self._fail_left <= 0:
                    self._fail_status, self._fail_left = None, None
            return web.Response(status=self._fail_status or 500, text="rpc error making call: injected failure")
        if request.query.get("dc", self.datacenter) != self.datacenter:
            return web.Response(status=500, text="No path to datacenter")
        if token and token not in self.tokens and self.acl:
            return web.Response(status=403, text="ACL not found")
        if not self.leader and request.method == "GET" and "stale" not in request.query:
            return web.Response(status=500, text="No cluster leader")
        response: web.StreamResponse = await handler(request)
        return response

    def _policy(self, request: web.Request) -> Policy:
        if not self.acl:
            return Policy(service_read="*", service_write="*")
        token = request.headers.get("X-Consul-Token") or bearer(request) or request.query.get("token")
        if not token:
            return self.anonymous
        if token not in self.tokens:
            # Consul resolves the token on every pass of a blocking query: one revoked mid-wait is a 403 too.
            raise web.HTTPForbidden(text="ACL not found")
        return self.tokens[token]

    async def _blocking(self, request: web.Request, compute: Callable[[], tuple[int, Any, bool]]) -> web.Response:
        """Consul's blockingQuery: answer when the result's index passes `index`, the wait ends, or on abandon."""
        try:
            min_index = int(request.query.get("index", "0"))
            wait = min(parse_go_duration(request.query["wait"]), MAX_WAIT_S) if "wait" in request.query \
                else DEFAULT_WAIT_S
        except ValueError as exc:
            return web.Response(status=400, text=f"Invalid blocking query parameter: {exc}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait + random.uniform(0, wait / 16)
        abandoned = self._abandoned
        while True:
            changed = self._changed
            index, payload, filtered = compute()
            if (min_index == 0 or index > min_index or self._abandoned != abandoned or loop.time() >= deadline
                    or self._closing):
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), deadline - loop.time())
        headers = {"X-Consul-Index": str(index), "X-Consul-KnownLeader": str(self.leader).lower(),
                   "X-Consul-LastContact": "0" if self.leader else "120000", "Content-Type": "application/json"}
        if filtered:
            headers["X-Consul-Results-Filtered-By-ACLs"] = "true"
        return web.Response(text=json.dumps(payload), headers=headers)

    def _index_for(self, key: str) -> int:
        return self._touched.get(key, self.index)

    def _entry(self, inst: Instance) -> dict[str, Any]:
        checks = [(c, self._status(c)) for c in self.checks.values() if c.service_id == inst.service_id]
        return health_entry(self, inst, checks)

    def _status(self, check: Check) -> str:
        if check.alias_service is None:
            return check.status
        targets = [c.status for c in self.checks.values() if c.service_id == check.alias_service]
        for worst in ("critical", "warning"):
            if worst in targets:
                return worst
        return "passing"

    def _health(self, request: web.Request, connect: bool) -> tuple[int, Any, bool]:
        name = request.match_info["name"]
        passing = request.query.get("passing", "false").lower() not in ("false", "0")
        if connect:
            chosen = [i for i in self.instances.values()
                      if (i.kind == "connect-proxy" and i.proxy.get("DestinationServiceName") == name)
                      or (i.native and i.name == name)]
        else:
            chosen = [i for i in self.instances.values() if i.name == name]
        entries = [self._entry(i) for i in sorted(chosen, key=lambda i: i.service_id)]
        if passing:
            entries = [e for e in entries if all(c["Status"] == "passing" for c in e["Checks"])]
        if tag := request.query.get("tag"):
            entries = [e for e in entries if tag in e["Service"]["Tags"]]
        policy = self._policy(request)
        visible = [e for e in entries if policy.can_read(e["Service"]["Service"])]
        index = max(1, self._index_for(f"connect:{name}" if connect else name)) if self.index else 0
        return index, visible, len(visible) != len(entries) or (self.acl and not policy.can_read(name))

    async def _health_service(self, request: web.Request) -> web.Response:
        return await self._blocking(request, lambda: self._health(request, connect=False))

    async def _health_connect(self, request: web.Request) -> web.Response:
        # Connect queries check service:read on the destination up front instead of filtering.
        if not self._policy(request).can_read(request.match_info["name"]):
            return denied("service:read", request.match_info["name"])
        return await self._blocking(request, lambda: self._health(request, connect=True))

    async def _catalog_services(self, request: web.Request) -> web.Response:
        def compute() -> tuple[int, Any, bool]:
            policy = self._policy(request)
            names: dict[str, set[str]] = {}
            for inst in self.instances.values():
                names.setdefault(inst.name, set()).update(inst.tags)
            visible = {n: sorted(t) for n, t in sorted(names.items()) if policy.can_read(n)}
            return self.index, visible, len(visible) != len(names)

        return await self._blocking(request, compute)

    async def _json(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text="Request decode failed: invalid JSON") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="Request decode failed: expected an object")
        return body

    async def _agent_register(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        name = get_ci(body, "Name")
        if not name:
            return web.Response(status=400, text="Invalid Service: Missing service name")
        if not self._policy(request).can_write(name):
            return denied("service:write", name)
        checks = list(get_ci(body, "Checks") or []) + ([get_ci(body, "Check")] if get_ci(body, "Check") else [])
        connect = get_ci(body, "Connect") or {}
        service_id = get_ci(body, "ID") or name
        self.register(name, int(get_ci(body, "Port", 0)), service_id=service_id, address=get_ci(body, "Address", ""),
                      tags=get_ci(body, "Tags") or [], meta=get_ci(body, "Meta") or {}, kind=get_ci(body, "Kind", ""),
                      proxy=get_ci(body, "Proxy") or {}, native=bool(get_ci(connect, "Native", False)), checks=checks)
        sidecar = get_ci(connect, "SidecarService")
        if sidecar is not None:
            # Consul's sidecar defaults: ID <id>-sidecar-proxy, a port from 21000-21255, the parent's tags and
            # meta, and an alias check so the proxy is exactly as healthy as the service behind it.
            self.register(f"{name}-sidecar-proxy", int(get_ci(sidecar, "Port") or next(self._sidecar_ports)),
                          service_id=f"{service_id}-sidecar-proxy", address=get_ci(sidecar, "Address") or "",
                          tags=get_ci(sidecar, "Tags") or get_ci(body, "Tags") or [],
                          meta=get_ci(sidecar, "Meta") or get_ci(body, "Meta") or {}, kind="connect-proxy",
                          proxy={"DestinationServiceName": name, "DestinationServiceID": service_id},
                          checks=[{"Name": f"Connect Sidecar Aliasing {service_id}", "AliasService": service_id}])
        return web.Response(text="")

    async def _agent_deregister(self, request: web.Request) -> web.Response:
        inst = self.instances.get(request.match_info["id"])
        if inst is None:
            return web.Response(status=404, text=f'Unknown service ID "{request.match_info["id"]}".')
        if not self._policy(request).can_write(inst.name):
            return denied("service:write", inst.name)
        self.deregister(inst.service_id)
        return web.Response(text="")

    def _writable_check(self, request: web.Request) -> Check | web.Response:
        check = self.checks.get(request.match_info["id"])
        if check is None:
            return web.Response(status=404, text=f'Unknown check ID "{request.match_info["id"]}".')
        name = self.instances[check.service_id].name
        if not self._policy(request).can_write(name):
            return denied("service:write", name)
        if check.ttl_s is None:
            return web.Response(status=500, text=f'CheckID "{check.check_id}" does not have associated TTL')
        return check

    def _ttl_update(self, check: Check, status: str, output: str) -> None:
        assert check.ttl_s is not None
        if check.timer is not None:
            check.timer.cancel()
        check.timer = asyncio.get_running_loop().call_later(check.ttl_s, self._ttl_expired, check.check_id)
        self.set_status(check.check_id, status, output)

    async def _agent_check_verb(self, request: web.Request) -> web.Response:
        check = self._writable_check(request)
        if isinstance(check, web.Response):
            return check
        status = {"pass": "passing", "warn": "warning", "fail": "critical"}[request.match_info["verb"]]
        self._ttl_update(check, status, request.query.get("note", ""))
        return web.Response(text="")

    async def _agent_check_update(self, request: web.Request) -> web.Response:
        check = self._writable_check(request)
        if isinstance(check, web.Response):
            return check
        body = await self._json(request)
        status = get_ci(body, "Status", "")
        if status not in ("passing", "warning", "critical"):
            return web.Response(status=400, text=f'Invalid check status: "{status}"')
        self._ttl_update(check, status, str(get_ci(body, "Output", "")))
        return web.Response(text="")
