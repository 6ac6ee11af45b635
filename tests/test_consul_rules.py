"""Pure parts of Consul discovery and resilience: blocking-query index rules, rate limit, backoff, entry parsing,
tag-driven routes, outlier ejection (injected clock), circuit limits, replayable bodies."""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh_gateway.config import ConsulRegister, Outlier
from mesh_gateway.discovery.blocking import Backoff, TokenBucket, advance, client_timeout_s, wait_param
from mesh_gateway.discovery.consul_entries import (
    IdentityRule,
    endpoints_from_entries,
    route_from_tags,
    routes_from_catalog,
    tagged_services,
)
from mesh_gateway.discovery.register import registration_target, service_definition
from mesh_gateway.errors import Overloaded
from mesh_gateway.model import Endpoint, SpiffeId
from mesh_gateway.upstream.circuit import Circuit
from mesh_gateway.upstream.outlier import OutlierDetector
from mesh_gateway.upstream.retry import ReplayableBody


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(("sent", "returned", "next_index", "changed", "reset"), [
    (0, 0, 1, True, False),        # X-Consul-Index 0 is treated as 1, so the next query blocks instead of spinning
    (1, 0, 1, False, False),       # …and stays 1 while the table is still empty
    (0, 42, 42, True, False),      # first read
    (42, 42, 42, False, False),    # a return without change is no change (wait elapsed, idempotent write)
    (42, 50, 50, True, False),     # a change
    (50, 7, 0, True, True),        # backwards (snapshot restore): reset to 0 and read afresh
])
def test_index_rules(sent, returned, next_index, changed, reset):
    step = advance(sent, returned)
    assert (step.next_index, step.changed, step.reset) == (next_index, changed, reset)


def test_client_timeout_exceeds_wait_plus_consul_jitter():
    for wait in (0.2, 10.0, 300.0, 600.0):
        assert client_timeout_s(wait) > wait + wait / 16
    assert wait_param(300.0) == "300000ms"
    assert wait_param(0.25) == "250ms"


def test_token_bucket_allows_a_burst_of_two_then_paces():
    clock = Clock()
    bucket = TokenBucket(rate_per_s=2.0, burst=2, clock=clock)
    assert bucket.delay() == 0.0
    assert bucket.delay() == 0.0
    assert bucket.delay() == pytest.approx(0.5)
    clock.now += 10  # refills, but never above the burst
    assert [bucket.delay() for _ in range(3)] == [0.0, 0.0, pytest.approx(0.5)]


def test_backoff_grows_with_jitter_and_is_capped_and_resets():
    backoff = Backoff(0.5, 8.0, random.Random(7))
    delays = [backoff.next() for _ in range(8)]
    ceilings = [min(8.0, 0.5 * 2**n) for n in range(8)]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len(set(delays)) == len(delays)  # jittered
    backoff.reset()
    assert backoff.next() <= 0.5


def entry(service_id, port, *, address="10.0.0.5", meta=None, node_address="10.0.0.1", dc="dc1"):
    return {"Node": {"Node": "n1", "Address": node_address, "Datacenter": dc},
            "Service": {"ID": service_id, "Service": "web", "Address": address, "Port": port, "Meta": meta or {}},
            "Checks": []}


OURS = IdentityRule("gateway_ca", "mesh.local")


def test_entries_become_sorted_endpoints_with_expected_identity():
    entries = [entry("b", 21001, meta={"spiffe_id": "spiffe://mesh.local/ns/default/sa/web"}),
               entry("a", 21000, address="", meta={"spiffe_id": "spiffe://mesh.local/ns/default/sa/web"})]
    endpoints, warnings = endpoints_from_entries("web", entries, "connect", OURS)
    assert warnings == []
    assert [(e.address, e.port) for e in endpoints] == [("10.0.0.1", 21000), ("10.0.0.5", 21001)]
    assert all(e.tls == "mtls" and str(e.spiffe_id) == "spiffe://mesh.local/ns/default/sa/web" for e in endpoints)


def test_entries_without_or_with_foreign_identity_are_skipped_fail_closed():
    good = {"spiffe_id": "spiffe://mesh.local/sa/web"}
    entries = [entry("a", 1), entry("b", 2, meta={"spiffe_id": "spiffe://evil.example/ns/default/sa/web"}),
               {"Service": "nonsense"}, entry("c", 3, meta=good),
               entry("d", 4, address="evil.example/steal#", meta=good)]
    endpoints, warnings = endpoints_from_entries("web", entries, "connect", OURS)
    assert [e.port for e in endpoints] == [3]
    assert len(warnings) == 4 and "outside trust domain" in warnings[1] and "neither an IP" in warnings[3]


def test_consul_ca_identity_follows_connect_spiffe_format():
    rule = IdentityRule("consul_ca", "mesh.local", "11111111-2222.consul", "default")
    (endpoint,), _ = endpoints_from_entries("web", [entry("a", 1, dc="eu1")], "connect", rule)
    assert endpoint.spiffe_id == SpiffeId.parse("spiffe://11111111-2222.consul/ns/default/dc/eu1/svc/web")


def test_plain_mode_needs_no_identity():
    (endpoint,), warnings = endpoints_from_entries("web", [entry("a", 8080)], "plain", OURS)
    assert (endpoint.tls, endpoint.spiffe_id, warnings) == ("plain", None, [])


@pytest.mark.parametrize(("tags", "host", "path"), [
    (["mesh-gateway.enable=true", "mesh-gateway.route.host=API.example.com"], "api.example.com", "/"),
    (["mesh-gateway.route.path_prefix=/orders", "v2"], "*", "/orders"),
    (["mesh-gateway.route.host=*.example.com", "mesh-gateway.route.path_prefix=/a"], "*.example.com", "/a"),
])
def test_tags_give_routes(tags, host, path):
    route = route_from_tags("orders", tags)
    assert (route.match.host, route.match.path, route.service, route.source) == (host, path, "orders", "consul")


@pytest.mark.parametrize("tags", [
    ["mesh-gateway.enable=true"],                                          # would be a catch-all
    ["mesh-gateway.route.path_prefix=orders"],                             # not a path
    ["mesh-gateway.route.path_prefix=/a/../admin"],
    ["mesh-gateway.route.host=bad host"],
    ["mesh-gateway.route.hots=a.example.com"],                             # typo: unknown key
    ["mesh-gateway.route.host=a.example.com", "mesh-gateway.route.host=b.example.com"],
])
def test_invalid_tags_are_rejected(tags):
    with pytest.raises(ValueError):
        route_from_tags("svc", tags)


def test_catalog_tags_select_services_and_order_routes_by_specificity():
    catalog = {"consul": [], "a": ["mesh-gateway.enable=true", "mesh-gateway.route.path_prefix=/a"],
               "b": ["mesh-gateway.enable=true", "mesh-gateway.route.path_prefix=/a/b"],
               "c": ["mesh-gateway.enable=true", "mesh-gateway.route.host=c.example.com"],
               "bad": ["mesh-gateway.enable=true"], "untagged": ["mesh-gateway.route.path_prefix=/x"],
               "a-sidecar-proxy": ["mesh-gateway.enable=true", "mesh-gateway.route.path_prefix=/a"],
               "x?passing=0": ["mesh-gateway.enable=true", "mesh-gateway.route.path_prefix=/x"]}
    tagged = tagged_services(catalog)
    assert set(tagged) == {"a", "b", "c", "bad"}
    routes, invalid = routes_from_catalog(tagged)
    assert [r.service for r in routes] == ["c", "b", "a"]
    assert set(invalid) == {"bad"}


def test_registration_definition_for_http_and_ttl_checks():
    http = service_definition(ConsulRegister(tags=("edge",)), service_id="gw-1", address="10.0.0.9", port=8443,
                              check_url="http://10.0.0.9:9901/readyz")
    assert http["Check"]["HTTP"] == "http://10.0.0.9:9901/readyz" and http["Check"]["Interval"] == "10000ms"
    assert (http["ID"], http["Port"], http["Tags"]) == ("gw-1", 8443, ["edge"])
    ttl = service_definition(ConsulRegister(check="ttl", ttl_s=15), service_id="gw-1", address="a", port=1,
                             check_url="")
    assert ttl["Check"]["TTL"] == "15000ms" and "HTTP" not in ttl["Check"]
    assert ttl["Check"]["DeregisterCriticalServiceAfter"] == "600000ms"


A, B, C = (Endpoint(f"10.0.0.{n}", 443, SpiffeId.parse("spiffe://mesh.local/web")) for n in (1, 2, 3))


def test_outlier_ejects_after_five_consecutive_failures_and_returns_after_base_time():
    clock = Clock()
    outlier = OutlierDetector(Outlier(), clock)
    for _ in range(4):
        assert not outlier.failure("web", A, set_size=2)
    outlier.success("web", A)  # a success breaks the streak
    assert [outlier.failure("web", A, 2) for _ in range(5)] == [False] * 4 + [True]
    assert not outlier.usable("web", A)
    clock.now += 29.9
    assert not outlier.usable("web", A)
    clock.now += 0.2
    assert outlier.usable("web", A)
    # The second ejection lasts twice as long.
    for _ in range(5):
        outlier.failure("web", A, 2)
    clock.now += 59.0
    assert not outlier.usable("web", A)
    clock.now += 1.1
    assert outlier.usable("web", A)


def test_outlier_never_ejects_more_than_half_a_set():
    outlier = OutlierDetector(Outlier(), Clock())
    for endpoint in (A, B, C):
        for _ in range(5):
            outlier.failure("web", endpoint, set_size=3)
    assert [outlier.usable("web", e) for e in (A, B, C)] == [False, True, True]
    lonely = OutlierDetector(Outlier(), Clock())
    for _ in range(10):
        lonely.failure("solo", A, set_size=1)
    assert lonely.usable("solo", A)


async def test_circuit_refuses_fast_beyond_concurrency_and_pending():
    circuit = Circuit("web", max_concurrent=1, max_pending=1)
    await circuit.acquire(1.0)
    waiter = asyncio.ensure_future(circuit.acquire(5.0))
    await asyncio.sleep(0)
    with pytest.raises(Overloaded):
        await circuit.acquire(1.0)  # one in flight, one pending: refused at once
    circuit.release()
    await waiter  # the pending one got the slot
    assert circuit.active == 1
    no_queue = Circuit("web", max_concurrent=1, max_pending=0)
    await no_queue.acquire(1.0)
    with pytest.raises(Overloaded):
        await no_queue.acquire(1.0)
    circuit.release()
    assert circuit.active == 0


async def test_circuit_pending_request_gives_up_after_its_timeout():
    circuit = Circuit("web", max_concurrent=1, max_pending=5)
    await circuit.acquire(1.0)
    with pytest.raises(Overloaded):
        await circuit.acquire(0.01)
    assert not circuit.waiters


async def test_replayable_body_replays_what_was_read_and_gives_up_past_the_cap():
    async def source(chunks):
        for chunk in chunks:
            yield chunk

    body = ReplayableBody(source([b"ab", b"cd", b"ef"]), cap=16)
    first = body.stream()
    assert await anext(first) == b"ab"  # an attempt that died after one chunk
    assert body.pulled
    assert b"".join([c async for c in body.stream()]) == b"abcdef"
    big = ReplayableBody(source([b"x" * 10, b"y" * 10]), cap=16)
    assert b"".join([c async for c in big.stream()]) == b"x" * 10 + b"y" * 10
    assert not big.replayable


def test_wildcard_listen_addresses_register_the_node_address_and_check_through_loopback():
    assert registration_target(ConsulRegister(), ("0.0.0.0", 8443), ("0.0.0.0", 9901)) == (
        "", 8443, "http://127.0.0.1:9901/readyz")
    assert registration_target(ConsulRegister(address="10.1.2.3", port=443), ("0.0.0.0", 8443),
                               ("::1", 9901)) == ("10.1.2.3", 443, "http://[::1]:9901/readyz")


@given(st.lists(st.integers(min_value=-5, max_value=10**12), min_size=1, max_size=30))
def test_index_never_spins_on_zero_and_resets_only_when_going_backwards(returned):
    sent = 0
    for value in returned:
        step = advance(sent, value)
        assert step.reset == (max(value, 1) < sent)
        assert step.next_index == (0 if step.reset else max(value, 1))
        sent = step.next_index


@given(st.lists(st.text(max_size=60), max_size=6), st.text(max_size=20))
def test_tag_parsing_only_ever_fails_with_value_error(tags, service):
    try:
        route = route_from_tags(service, ["mesh-gateway.enable=true", *tags])
    except ValueError:
        return
    assert route.match.path.startswith("/") and ".." not in route.match.path.split("/")


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                 max_size=4), max_leaves=20))
def test_hostile_health_answers_never_crash_the_parser(answer):
    endpoints, _ = endpoints_from_entries("web", answer, "connect", OURS)
    assert all(e.spiffe_id is not None and e.spiffe_id.member_of("mesh.local") for e in endpoints)
