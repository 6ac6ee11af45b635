"""The Consul watcher against the fake agent over real HTTP: blocking semantics, index rules, outages, ACLs,
stale reads, datacenter, TLS to Consul, tag-driven routes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mesh_gateway.identity.ca import CertificateAuthority
from mesh_gateway.identity.tls import server_context
from mesh_gateway.model import Catalog, EndpointSet
from tests.consul_support import consul_settings, eventually, ports, register_sidecar, until, watching
from tests.fakes.consul import FakeConsul, Policy
from tests.support import issue, write_credentials


@pytest.fixture
async def fake() -> AsyncIterator[FakeConsul]:
    agent = FakeConsul()
    await agent.start()
    yield agent
    await agent.close()


def connect_queries(fake: FakeConsul, service: str = "web"):
    return [s for s in fake.seen if s.path == f"/v1/health/connect/{service}"]


def last_error(watcher, key: str = "web") -> str | None:
    state = watcher.states().get(key)
    return state.last_error if state is not None else None


async def test_changes_arrive_on_the_open_blocking_query(fake):
    # wait_s=60 and a 5 s deadline: only a blocking query answering at the change can deliver in time.
    async with watching(consul_settings(fake, wait_s=60)) as watcher:
        await until(watcher.catalog, lambda c: c.get("web") is not None)
        register_sidecar(fake, "web-1", 21001)
        catalog = await until(watcher.catalog, lambda c: ports(c) == [21001])
        endpoint = catalog.get("web").endpoints[0]
        assert (endpoint.tls, str(endpoint.spiffe_id)) == ("mtls", "spiffe://mesh.local/ns/default/sa/web")
        # The second query (index 1, blocking for 60 s) was open when we registered, and it answered.
        assert connect_queries(fake)[1].query == {"passing": "1", "index": "1", "wait": "60000ms"}
        fake.deregister("web-1")
        # Explicit deregistration of the last instance does empty the set.
        await until(watcher.catalog, lambda c: c.get("web") is not None and ports(c) == [])


async def test_index_zero_is_treated_as_one_so_the_query_blocks(fake):
    assert fake.index == 0  # a fresh agent answers X-Consul-Index: 0
    async with watching(consul_settings(fake)) as watcher:
        await until(watcher.catalog, lambda c: c.get("web") is not None)
        second = await eventually(lambda: connect_queries(fake)[1:2])
        assert second[0].query["index"] == "1" and "wait" in second[0].query
        register_sidecar(fake, "web-1", 21001)
        await until(watcher.catalog, lambda c: ports(c) == [21001])
    # No busy loop: the index-1 query blocked until the registration.
    assert len(connect_queries(fake)) <= 4


async def test_index_going_backwards_resets_and_never_wipes_on_the_restored_answer(fake):
    register_sidecar(fake, "web-1", 21001)
    async with watching(consul_settings(fake)) as watcher:
        await until(watcher.catalog, lambda c: ports(c) == [21001])
        await eventually(lambda: len(connect_queries(fake)) >= 2)
        # Restore a snapshot taken before web-1 existed: the index goes back and the answer is empty.
        fake.restore_snapshot(1, without=["web-1", "web-1-sidecar-proxy"])
        fresh = await eventually(lambda: [s for s in connect_queries(fake)[2:] if "index" not in s.query])
        assert fresh  # re-read from scratch (index reset to 0)
        assert ports(watcher.catalog.get()) == [21001]  # the transient empty answer did not wipe the set
        register_sidecar(fake, "web-2", 21002)  # a real change past the restored index is believed
        await until(watcher.catalog, lambda c: ports(c) == [21002])


async def test_500s_keep_the_last_known_set_show_staleness_and_recover(fake, caplog):
    register_sidecar(fake, "web-1", 21001)
    async with watching(consul_settings(fake, wait_s=0.2)) as watcher:
        await until(watcher.catalog, lambda c: ports(c) == [21001])
        fake.fail(500)
        state = await eventually(lambda: (s := watcher.states()["web"]).errors >= 3 and s)
        assert "HTTP 500" in (state.last_error or "")
        assert ports(watcher.catalog.get()) == [21001]
        assert "serving last known endpoints" in caplog.text
        fake.heal()
        register_sidecar(fake, "web-2", 21002)
        await until(watcher.catalog, lambda c: ports(c) == [21001, 21002])
        assert watcher.states()["web"].errors == 0


async def test_a_hanging_agent_times_out_and_recovers(fake):
    register_sidecar(fake, "web-1", 21001)
    async with watching(consul_settings(fake, wait_s=0.2)) as watcher:
        await until(watcher.catalog, lambda c: ports(c) == [21001])
        fake.hang()
        state = await eventually(lambda: last_error(watcher), timeout_s=10)
        assert "no answer within" in state
        assert ports(watcher.catalog.get()) == [21001]
        fake.heal()
        register_sidecar(fake, "web-2", 21002)
        await until(watcher.catalog, lambda c: ports(c) == [21001, 21002])


async def test_revoked_or_wrong_acl_token_logs_a_clear_error_and_keeps_endpoints(tmp_path: Path, caplog):
    fake = FakeConsul(tokens={"good": Policy(service_read={"web", "web-sidecar-proxy"})})
    await fake.start()
    try:
        register_sidecar(fake, "web-1", 21001)
        token_file = tmp_path / "consul.token"
        token_file.write_text("good\n")
        async with watching(consul_settings(fake, wait_s=0.2, token_file=str(token_file))) as watcher:
            await until(watcher.catalog, lambda c: ports(c) == [21001])
            assert connect_queries(fake)[0].token == "good"
            del fake.tokens["good"]  # revoked
            token_file.write_text("rotated")  # a new token, not yet granted anything
            state = await eventually(lambda: (s := watcher.states()["web"]).errors >= 2 and s)
            assert state.acl_error
            assert [r for r in caplog.records if r.levelno == logging.ERROR and "ACL token refused" in r.message]
            assert ports(watcher.catalog.get()) == [21001]
            assert any(s.token == "rotated" for s in connect_queries(fake))  # re-read after the 403
            fake.tokens["rotated"] = Policy(service_read={"web", "web-sidecar-proxy"})
            register_sidecar(fake, "web-2", 21002)
            await until(watcher.catalog, lambda c: ports(c) == [21001, 21002])
    finally:
        await fake.close()


async def test_missing_token_with_results_filtered_by_acls_is_an_error_not_an_empty_service(caplog):
    fake = FakeConsul(tokens={})
    await fake.start()
    try:
        fake.register("web", 8080, service_id="web-1", status="passing")
        settings = consul_settings(fake, wait_s=0.2, services=[{"name": "web", "mode": "plain"}])
        known = Catalog({"web": EndpointSet("web", (), source="consul")})
        async with watching(settings) as watcher:
            state = await eventually(lambda: (s := watcher.states().get("web")) and s.acl_error and s)
            assert "filtered by ACLs" in (state.last_error or "")
            assert watcher.catalog.get() != known  # nothing was published as "web has no instances"
            assert "ACL token refused" in caplog.text
    finally:
        await fake.close()


async def test_stale_reads_keep_discovery_working_without_a_leader_and_dc_is_sent(fake):
    register_sidecar(fake, "web-1", 21001)
    fake.leader = False
    async with watching(consul_settings(fake, stale=True, datacenter="dc1")) as watcher:
        await until(watcher.catalog, lambda c: ports(c) == [21001])
        assert all("stale" in s.query and s.query["dc"] == "dc1" for s in connect_queries(fake))
    async with watching(consul_settings(fake, wait_s=0.2)) as consistent:
        state = await eventually(lambda: last_error(consistent))
        assert "No cluster leader" in state
    fake.leader = True
    async with watching(consul_settings(fake, datacenter="dc9")) as elsewhere:
        assert "No path to datacenter" in await eventually(lambda: last_error(elsewhere))


async def test_failing_check_instances_are_never_published(fake):
    register_sidecar(fake, "web-1", 21001)
    register_sidecar(fake, "web-2", 21002, status="critical")
    async with watching(consul_settings(fake)) as watcher:
        await until(watcher.catalog, lambda c: ports(c) == [21001])
        fake.set_status("service:web-2", "passing")
        await until(watcher.catalog, lambda c: ports(c) == [21001, 21002])
        fake.set_status("service:web-1", "warning")  # passing=1 means passing only
        await until(watcher.catalog, lambda c: ports(c) == [21002])


async def test_tag_driven_routes_follow_the_catalog_and_invalid_tags_warn_once(fake, caplog):
    async with watching(consul_settings(fake, services=[], watch_tagged=True)) as watcher:
        fake.register("orders", 8080, service_id="orders-1", meta={"spiffe_id": "spiffe://mesh.local/orders"},
                      tags=["mesh-gateway.enable=true", "mesh-gateway.route.path_prefix=/orders"], native=True,
                      status="passing")
        fake.register("broken", 8081, service_id="broken-1", tags=["mesh-gateway.enable=true",
                                                                  "mesh-gateway.route.path_prefix=orders"])
        routes = await until(watcher.routes, lambda r: len(r) == 1)
        assert (routes[0].service, routes[0].match.path) == ("orders", "/orders")
        await until(watcher.catalog, lambda c: ports(c, "orders") == [8080])
        fake.register("other", 1, service_id="other-1")  # unrelated changes re-read the list…
        fake.register("other", 2, service_id="other-2")
        await eventually(lambda: watcher.states()["(catalog)"].index >= fake.index)
        warnings = [r for r in caplog.records if "broken" in r.message and "skipped" in r.message]
        assert len(warnings) == 1  # …but the invalid tags are reported once
        fake.deregister("orders-1")
        await until(watcher.routes, lambda r: r == ())
        await until(watcher.catalog, lambda c: c.get("orders") is None)


async def test_https_to_consul_with_ca_and_client_certificate(ca: CertificateAuthority, tmp_path: Path):
    agent_creds = issue(ca, "spiffe://mesh.local/consul", dns=("localhost",))
    context = server_context(agent_creds.cert_chain_pem, agent_creds.key_pem, client_auth="required",
                             client_ca_pem=agent_creds.bundle_pem)
    cert, key = write_credentials(issue(ca, "spiffe://mesh.local/ns/default/sa/gateway"), tmp_path, "gw")
    (tmp_path / "ca.pem").write_bytes(ca.bundle_pem)
    fake = FakeConsul()
    await fake.start(ssl_context=context)
    try:
        register_sidecar(fake, "web-1", 21001)
        # Connect by IP, verify the agent's certificate under the name it was issued for.
        tls = {"ca_file": str(tmp_path / "ca.pem"), "cert_file": str(cert), "key_file": str(key),
               "server_name": "localhost"}
        async with watching(consul_settings(fake, tls=tls)) as watcher:
            await until(watcher.catalog, lambda c: ports(c) == [21001])
        no_client_cert = {"ca_file": str(tmp_path / "ca.pem"), "server_name": "localhost"}
        async with watching(consul_settings(fake, tls=no_client_cert)) as no_cert:
            assert await eventually(lambda: last_error(no_cert))
            assert no_cert.catalog.get().get("web") is None
    finally:
        await fake.close()


async def test_tag_routes_survive_a_revoked_token():
    fake = FakeConsul(tokens={"good": Policy(service_read="*")})
    await fake.start()
    try:
        fake.register("orders", 8080, service_id="orders-1", meta={"spiffe_id": "spiffe://mesh.local/orders"},
                      tags=["mesh-gateway.enable=true", "mesh-gateway.route.path_prefix=/orders"], native=True,
                      status="passing")
        settings = consul_settings(fake, wait_s=0.2, services=[], watch_tagged=True, token="good")
        async with watching(settings) as watcher:
            await until(watcher.routes, lambda r: len(r) == 1)
            await until(watcher.catalog, lambda c: ports(c, "orders") == [8080])
            del fake.tokens["good"]
            await eventually(lambda: (s := watcher.states().get("(catalog)")) and s.acl_error)
            await eventually(lambda: (s := watcher.states().get("orders")) and s.acl_error)
            assert [r.service for r in watcher.routes.get()] == ["orders"]
            assert ports(watcher.catalog.get(), "orders") == [8080]
    finally:
        await fake.close()
