"""Through the real gateway: Consul-discovered services become routable, survive outages, follow tags and
checks; the gateway registers itself; retries, outlier ejection, circuit limits and least-request balancing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from mesh_gateway.demo.upstream import start_upstream
from tests.consul_support import eventually, ports, until
from tests.fakes.consul import FakeConsul
from tests.support import WEB_ID, admin_url, client_ssl, gateway_config, issue, running, url
from tests.upstreams import start_controlled, start_resetter

ORDERS_ID = "spiffe://mesh.local/ns/default/sa/orders"


@pytest.fixture
async def fake() -> AsyncIterator[FakeConsul]:
    agent = FakeConsul()
    await agent.start()
    yield agent
    await agent.close()


def consul_block(fake: FakeConsul, **overrides: Any) -> dict[str, Any]:
    block: dict[str, Any] = {"address": fake.url.split("://")[1], "wait_s": 60, "retry_base_s": 0.01,
                             "retry_max_s": 0.05, "rate_limit_per_s": 100, "services": [{"name": "web"}],
                             "watch_tagged": False}
    block.update(overrides)
    return {"consul": block}


WEB_ROUTE = [{"name": "web", "match": {"path_prefix": "/"}, "service": "web"}]


async def agent(fake: FakeConsul, path: str, body: Any = None) -> None:
    async with aiohttp.ClientSession() as session, session.put(fake.url + path, json=body) as resp:
        assert resp.status == 200, await resp.text()


async def register_mesh(fake: FakeConsul, service_id: str, port: int, *, name: str = "web", spiffe_id: str = WEB_ID,
                        tags: list[str] | None = None, check: dict[str, Any] | None = None) -> None:
    """What `consul services register` does for a service with `connect { sidecar_service { port = … } }`."""
    await agent(fake, "/v1/agent/service/register", {
        "ID": service_id, "Name": name, "Port": 9, "Meta": {"spiffe_id": spiffe_id}, "Tags": tags or [],
        "Check": check or {"TTL": "1h", "Status": "passing"},
        "Connect": {"SidecarService": {"Port": port}}})


async def get(client: aiohttp.ClientSession, gw: Any, ssl: Any, path: str = "/",
              method: str = "GET", data: bytes | None = None) -> tuple[int, str | None, str]:
    async with client.request(method, url(gw, path), ssl=ssl, data=data) as resp:
        return resp.status, resp.headers.get("x-upstream"), await resp.text()


async def clusters(client: aiohttp.ClientSession, gw: Any) -> dict[str, Any]:
    async with client.get(admin_url(gw, "/clusters")) as resp:
        view: dict[str, Any] = await resp.json()
        return {s["name"]: s for s in view["services"]}


async def test_registered_instance_becomes_routable_and_deregistered_stops_receiving(ca, ca_dir, client_creds,
                                                                                     fake):
    a = await start_upstream("web-a", issue(ca, WEB_ID))
    b = await start_upstream("web-b", issue(ca, WEB_ID))
    await register_mesh(fake, "web-a", a.port)
    config = gateway_config(ca_dir, {}, routes=WEB_ROUTE, discovery=consul_block(fake))
    ssl = client_ssl(ca.bundle_pem, client_creds)
    try:
        async with running(config) as gw, aiohttp.ClientSession() as client:
            await until(gw.catalog, lambda c: ports(c) == [a.port])
            assert (await get(client, gw, ssl))[:2] == (200, "web-a")
            await register_mesh(fake, "web-b", b.port)
            await until(gw.catalog, lambda c: sorted(ports(c)) == sorted([a.port, b.port]))
            assert {(await get(client, gw, ssl))[1] for _ in range(4)} == {"web-a", "web-b"}
            await agent(fake, "/v1/agent/service/deregister/web-a")
            await until(gw.catalog, lambda c: ports(c) == [b.port])
            assert [(await get(client, gw, ssl))[1] for _ in range(4)] == ["web-b"] * 4
    finally:
        await a.close()
        await b.close()


async def test_failing_check_instance_is_never_chosen(ca, ca_dir, client_creds, fake):
    a = await start_controlled("web-a", issue(ca, WEB_ID))
    b = await start_controlled("web-b", issue(ca, WEB_ID))
    await register_mesh(fake, "web-a", a.port)
    await register_mesh(fake, "web-b", b.port, check={"TTL": "1h"})  # TTL checks start critical
    config = gateway_config(ca_dir, {}, routes=WEB_ROUTE, discovery=consul_block(fake))
    ssl = client_ssl(ca.bundle_pem, client_creds)
    try:
        async with running(config) as gw, aiohttp.ClientSession() as client:
            await until(gw.catalog, lambda c: ports(c) == [a.port])
            assert {(await get(client, gw, ssl))[1] for _ in range(6)} == {"web-a"}
            assert b.hits == 0
            await agent(fake, "/v1/agent/check/pass/service:web-b")
            await until(gw.catalog, lambda c: len(ports(c)) == 2)
            assert {(await get(client, gw, ssl))[1] for _ in range(4)} == {"web-a", "web-b"}
    finally:
        await a.close()
        await b.close()


async def test_consul_outage_keeps_traffic_flowing_shows_staleness_and_recovers(ca, ca_dir, client_creds, fake):
    a = await start_controlled("web-a", issue(ca, WEB_ID))
    b = await start_controlled("web-b", issue(ca, WEB_ID))
    await register_mesh(fake, "web-a", a.port)
    config = gateway_config(ca_dir, {}, routes=WEB_ROUTE, discovery=consul_block(fake, wait_s=0.2))
    ssl = client_ssl(ca.bundle_pem, client_creds)
    try:
        async with running(config) as gw, aiohttp.ClientSession() as client:
            await until(gw.catalog, lambda c: ports(c) == [a.port])
            fake.fail(500)

            async def failing() -> Any:
                web = (await clusters(client, gw))["web"]
                return web if web["consul"]["consecutive_errors"] >= 2 else None

            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while not (web := await failing()):
                assert loop.time() < deadline
            assert "HTTP 500" in web["consul"]["last_error"]
            assert web["consul"]["seconds_since_update"] >= 0 and web["consul"]["index"] > 0
            assert [e["port"] for e in web["endpoints"]] == [a.port]
            assert [(await get(client, gw, ssl))[:2] for _ in range(3)] == [(200, "web-a")] * 3
            fake.heal()
            await register_mesh(fake, "web-b", b.port)
            await until(gw.catalog, lambda c: len(ports(c)) == 2)
            web = (await clusters(client, gw))["web"]
            assert web["consul"]["last_error"] is None and web["source"] == "consul"
    finally:
        await a.close()
        await b.close()


async def test_tag_driven_route_appears_and_disappears_with_the_catalog(ca, ca_dir, client_creds, fake):
    orders = await start_controlled("orders", issue(ca, ORDERS_ID))
    config = gateway_config(ca_dir, {}, routes=[], discovery=consul_block(fake, services=[], watch_tagged=True))
    ssl = client_ssl(ca.bundle_pem, client_creds)
    try:
        async with running(config) as gw, aiohttp.ClientSession() as client:
            assert (await get(client, gw, ssl, "/orders/7"))[0] == 404
            await register_mesh(fake, "orders-1", orders.port, name="orders", spiffe_id=ORDERS_ID,
                                tags=["mesh-gateway.enable=true", "mesh-gateway.route.path_prefix=/orders"])
            await until(gw.catalog, lambda c: ports(c, "orders") == [orders.port])
            await until(gw.routes, lambda r: [x.name for x in r.table.routes] == ["consul.orders"])
            assert (await get(client, gw, ssl, "/orders/7"))[:2] == (200, "orders")
            assert (await get(client, gw, ssl, "/elsewhere"))[0] == 404
            await agent(fake, "/v1/agent/service/deregister/orders-1")
            await until(gw.routes, lambda r: r.table.routes == ())
            assert (await get(client, gw, ssl, "/orders/7"))[0] == 404
    finally:
        await orders.close()


@pytest.mark.parametrize("check", ["http", "ttl"])
async def test_gateway_registers_itself_with_a_passing_check_and_deregisters_on_shutdown(ca, ca_dir, fake, check):
    registration = {"enabled": True, "check": check, "interval_s": 0.2, "ttl_s": 5, "tags": ["edge"]}
    config = gateway_config(ca_dir, {}, routes=[], discovery=consul_block(fake, services=[],
                                                                           registration=registration))
    async with running(config) as gw:
        host, port = gw.addresses["public"]
        service_id = f"mesh-gateway-{host}-{port}"
        await eventually(lambda: fake.checks.get(f"service:{service_id}")
                         and fake.checks[f"service:{service_id}"].status == "passing")
        instance = fake.instances[service_id]
        assert (instance.port, instance.tags) == (port, ["edge"])
        if check == "http":
            assert fake.checks[f"service:{service_id}"].http.endswith("/readyz")
    assert service_id not in fake.instances


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_outlier_ejection_and_return(ca, ca_dir, client_creds):
    bad = await start_controlled("bad", issue(ca, WEB_ID), status=500)
    good = await start_controlled("good", issue(ca, WEB_ID))
    static = {"web": [{"address": "127.0.0.1", "port": bad.port, "spiffe_id": WEB_ID},
                      {"address": "127.0.0.1", "port": good.port, "spiffe_id": WEB_ID}]}
    config = gateway_config(ca_dir, static)
    ssl = client_ssl(ca.bundle_pem, client_creds)
    clock = Clock()
    try:
        async with running(config, clock=clock) as gw, aiohttp.ClientSession() as client:
            statuses = [(await get(client, gw, ssl))[0] for _ in range(10)]
            assert statuses.count(500) == 5 and bad.hits == 5  # round-robin: five consecutive 5xx on `bad`
            assert [(await get(client, gw, ssl))[:2] for _ in range(4)] == [(200, "good")] * 4
            ejected = {e["port"]: e for e in (await clusters(client, gw))["web"]["endpoints"]}
            assert ejected[bad.port]["ejected"] and ejected[bad.port]["ejection_seconds_left"] == 30.0
            assert not ejected[good.port]["ejected"]
            async with client.get(admin_url(gw, "/metrics")) as resp:
                assert 'mesh_gateway_upstream_ejections_total{service="web"} 1.0' in await resp.text()
            clock.now += 30.0  # base ejection time passed: `bad` is back
            assert {(await get(client, gw, ssl))[1] for _ in range(4)} == {"bad", "good"}
    finally:
        await bad.close()
        await good.close()


@contextlib.asynccontextmanager
async def reset_then_good(ca: Any, ca_dir: Any) -> AsyncIterator[tuple[Any, Any, Any]]:
    resetter = await start_resetter(issue(ca, WEB_ID))
    good = await start_controlled("good", issue(ca, WEB_ID))
    static = {"web": [{"address": "127.0.0.1", "port": resetter.port, "spiffe_id": WEB_ID},
                      {"address": "127.0.0.1", "port": good.port, "spiffe_id": WEB_ID}]}
    try:
        async with running(gateway_config(ca_dir, static)) as gw:
            yield gw, resetter, good
    finally:
        await resetter.close()
        await good.close()


async def test_idempotent_get_on_a_reset_connection_is_retried(ca, ca_dir, client_creds):
    async with reset_then_good(ca, ca_dir) as (gw, resetter, good), aiohttp.ClientSession() as client:
        status, upstream, _ = await get(client, gw, client_ssl(ca.bundle_pem, client_creds), "/items")
        assert (status, upstream) == (200, "good")
        assert len(resetter.requests) == 1 and good.hits == 1


async def test_post_whose_body_was_sent_is_not_retried(ca, ca_dir, client_creds):
    async with reset_then_good(ca, ca_dir) as (gw, resetter, good), aiohttp.ClientSession() as client:
        status, _, _ = await get(client, gw, client_ssl(ca.bundle_pem, client_creds), "/orders", "POST",
                                 b"pay 10 EUR")
        assert status == 502
        assert resetter.requests[0].endswith(b"pay 10 EUR")  # the body did reach an upstream…
        assert good.hits == 0  # …so it was not sent a second time


async def test_circuit_limit_answers_503_fast(ca, ca_dir, client_creds):
    gate = asyncio.Event()
    slow = await start_controlled("slow", issue(ca, WEB_ID), hold=gate)
    static = {"web": [{"address": "127.0.0.1", "port": slow.port, "spiffe_id": WEB_ID}]}
    config = gateway_config(ca_dir, static, resilience={"services": {"web": {"max_concurrent": 1}}})
    ssl = client_ssl(ca.bundle_pem, client_creds)
    try:
        async with running(config) as gw, aiohttp.ClientSession() as client:
            first = asyncio.ensure_future(get(client, gw, ssl))
            await eventually(lambda: slow.hits == 1)
            status, _, body = await get(client, gw, ssl)
            assert (status, "upstream overloaded" in body) == (503, True)
            assert slow.hits == 1
            gate.set()
            assert (await first)[:2] == (200, "slow")
    finally:
        await slow.close()


@pytest.mark.parametrize("where", ["service", "route"])
async def test_least_request_sends_new_requests_to_the_idle_endpoint(ca, ca_dir, client_creds, where):
    gates = {"a": asyncio.Event(), "b": asyncio.Event()}
    ups = {n: await start_controlled(n, issue(ca, WEB_ID), hold=g) for n, g in gates.items()}
    static = {"web": [{"address": "127.0.0.1", "port": u.port, "spiffe_id": WEB_ID} for u in ups.values()]}
    if where == "service":
        config = gateway_config(ca_dir, static,
                                resilience={"services": {"web": {"load_balancing": "least_request"}}})
    else:
        config = gateway_config(ca_dir, static, routes=[{"name": "web", "service": "web",
                                                         "load_balancing": "least_request"}])
    ssl = client_ssl(ca.bundle_pem, client_creds)
    try:
        async with running(config) as gw, aiohttp.ClientSession() as client:
            first = asyncio.ensure_future(get(client, gw, ssl))
            busy = await eventually(lambda: next((n for n, u in ups.items() if u.hits), None))
            idle = "b" if busy == "a" else "a"
            gates[idle].set()
            assert [(await get(client, gw, ssl))[1] for _ in range(3)] == [idle] * 3
            gates[busy].set()
            assert (await first)[1] == busy
    finally:
        for upstream in ups.values():
            await upstream.close()


def closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(("first", "method", "expected"), [
    ("refused", "POST", (200, "good")),        # connect failed: not a byte was sent, so even a POST moves on
    ("503", "GET", (200, "good")),             # 503 on an idempotent request: try another endpoint
    ("503", "POST", (503, "first")),           # …but a POST that reached an upstream is answered as it is
    ("silent", "GET", (200, "good")),          # no answer within the per-try timeout: the next try goes elsewhere
])
async def test_retry_rules(ca, ca_dir, client_creds, first, method, expected):
    gate = asyncio.Event()
    bad = await start_controlled("first", issue(ca, WEB_ID), status=503 if first == "503" else 200,
                                 hold=gate if first == "silent" else None)
    good = await start_controlled("good", issue(ca, WEB_ID))
    first_port = closed_port() if first == "refused" else bad.port
    static = {"web": [{"address": "127.0.0.1", "port": first_port, "spiffe_id": WEB_ID},
                      {"address": "127.0.0.1", "port": good.port, "spiffe_id": WEB_ID}]}
    routes = [{"name": "web", "match": {"path_prefix": "/"}, "service": "web", "per_try_timeout_s": 0.3}]
    config = gateway_config(ca_dir, static, routes=routes)
    try:
        async with running(config) as gw, aiohttp.ClientSession() as client:
            status, upstream, _ = await get(client, gw, client_ssl(ca.bundle_pem, client_creds), "/x", method,
                                            b"body" if method == "POST" else None)
            assert (status, upstream) == expected
            assert good.hits == (1 if expected[1] == "good" else 0)
    finally:
        await bad.close()
        await good.close()


async def test_not_ready_until_consul_answered_once(ca, ca_dir, fake):
    fake.hang()
    config = gateway_config(ca_dir, {}, routes=WEB_ROUTE, discovery=consul_block(fake))
    async with running(config) as gw, aiohttp.ClientSession() as client:
        async with client.get(admin_url(gw, "/readyz")) as resp:
            assert resp.status == 503 and "consul: no answer yet for web" in await resp.text()
        fake.heal()

        async def ready() -> bool:
            async with client.get(admin_url(gw, "/readyz")) as resp:
                return resp.status == 200

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while not await ready():
            assert loop.time() < deadline


async def test_plaintext_service_is_reachable_only_through_a_route_that_allows_it(ca, ca_dir, client_creds, fake):
    legacy = await start_controlled("legacy", None)
    fake.register("legacy", legacy.port, service_id="legacy-1", address="127.0.0.1", status="passing")
    routes = [{"name": "strict", "match": {"path_prefix": "/strict"}, "service": "legacy"},
              {"name": "lenient", "match": {"path_prefix": "/lenient"}, "service": "legacy",
               "upstream_security": "plain"}]
    config = gateway_config(ca_dir, {}, routes=routes,
                            discovery=consul_block(fake, services=[{"name": "legacy", "mode": "plain"}]))
    ssl = client_ssl(ca.bundle_pem, client_creds)
    try:
        async with running(config) as gw, aiohttp.ClientSession() as client:
            await until(gw.catalog, lambda c: ports(c, "legacy") == [legacy.port])
            assert (await get(client, gw, ssl, "/strict"))[0] == 503  # the route expects mTLS: nothing usable
            assert legacy.hits == 0
            assert (await get(client, gw, ssl, "/lenient"))[:2] == (200, "legacy")
    finally:
        await legacy.close()
