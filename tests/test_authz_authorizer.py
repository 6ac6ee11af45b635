"""PolicyAuthorizer over both engines: identical decisions, fail-closed outcomes, dry-run, cache, decision log."""

from __future__ import annotations

import dataclasses
import io
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mesh_gateway.authz.authorizer import PolicyAuthorizer
from mesh_gateway.authz.cache import CacheSettings
from mesh_gateway.authz.decision_log import DecisionLog
from mesh_gateway.authz.opa import OpaClient
from mesh_gateway.authz.rego import EmbeddedEngine
from mesh_gateway.errors import AuthzUnavailable, BadRequest
from mesh_gateway.model import Decision, Route, RouteMatch, RoutePolicy
from mesh_gateway.pipeline import Exchange
from tests.authz_helpers import CLIENT_ID, CONSOLE_ID, FixedSpan, Policies, request_info, shipped_policies
from tests.fakes.opa import FakeOpa

ROUTE = Route(name="api", match=RouteMatch(), service="web")
RESULT = "data.envoy.authz.result"


def route(**policy: object) -> Route:
    return dataclasses.replace(ROUTE, policy=RoutePolicy(**policy))  # type: ignore[arg-type]


def exchange(info=None) -> Exchange:  # type: ignore[no-untyped-def]
    return Exchange(info or request_info(), span=FixedSpan("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"))


@pytest.fixture
def policies(tmp_path: Path) -> Policies:
    return shipped_policies(tmp_path)


@pytest.fixture
async def opa(policies: Policies) -> AsyncIterator[FakeOpa]:
    fake = await FakeOpa(policies.path).start()
    yield fake
    await fake.close()


def embedded(policies: Policies, **kw: object) -> PolicyAuthorizer:
    engine = EmbeddedEngine(policies.path)
    engine.load()
    return PolicyAuthorizer(engine, **kw)  # type: ignore[arg-type]


def remote(url: str, timeout_s: float = 0.2, **kw: object) -> PolicyAuthorizer:
    return PolicyAuthorizer(OpaClient(url, timeout_s=timeout_s), **kw)  # type: ignore[arg-type]


def comparable(decision: Decision) -> tuple[object, ...]:
    return (decision.allowed, decision.http_status, decision.body, decision.headers, decision.response_headers_to_add,
            decision.request_headers_to_remove)


def parity_table(policies: Policies) -> list[tuple[str, dict[str, object]]]:
    admin = ("authorization", f"Bearer {policies.token(['admin'])}")
    viewer = ("authorization", f"Bearer {policies.token(['viewer'])}")
    expired = ("authorization", f"Bearer {policies.token(['admin'], expires_in_s=-60)}")
    rows: list[tuple[str, dict[str, object]]] = []
    for query in ("data.envoy.authz.allow", RESULT):
        rows += [
            (query, {"path": "/api/orders"}),
            (query, {"path": "/api"}),
            (query, {"path": "/api/orders", "method": "POST"}),
            (query, {"path": "/api/users", "method": "POST"}),
            (query, {"path": "/api/orders/1", "method": "DELETE"}),
            (query, {"path": "/apix"}),
            (query, {"path": "/healthz", "method": "HEAD"}),
            (query, {"path": "/api/orders", "principal": None}),
            (query, {"path": "/api/orders", "principal": "spiffe://mesh.local/ns/default/sa/intruder"}),
            (query, {"path": "/admin/users", "principal": CONSOLE_ID}),
            (query, {"path": "/admin/users", "principal": CONSOLE_ID, "headers": (admin,)}),
            (query, {"path": "/admin/users", "principal": CONSOLE_ID, "headers": (viewer,)}),
            (query, {"path": "/admin/users", "principal": CONSOLE_ID, "headers": (expired,)}),
            (query, {"path": "/admin", "headers": (admin,)}),
            (query, {"path": "/api/%2e%2e/admin", "principal": CONSOLE_ID}),
            (query, {"path": "//api//orders", "query": "page=2"}),
            (query, {"path": "/ADMIN", "principal": CONSOLE_ID, "headers": (admin,)}),
            (query, {"path": "/api;v=1/orders"}),
        ]
    return rows


async def test_embedded_and_remote_opa_decide_identically(policies, opa):
    local, far = embedded(policies), remote(opa.url)
    table = parity_table(policies)
    assert len(table) >= 20
    outcomes = []
    try:
        for query, fields in table:
            info = request_info(**fields)  # type: ignore[arg-type]
            target = route(authz_query=query)
            mine = await local.check(info, target, exchange(info))
            theirs = await far.check(info, target, exchange(info))
            assert comparable(mine) == comparable(theirs), (query, fields)
            assert theirs.decision_id and theirs.engine == "opa" and mine.engine == "embedded"
            outcomes.append(mine.allowed)
    finally:
        await far.close()
    assert len(opa.requests) == len(table)
    assert 5 <= outcomes.count(True) <= len(table) - 5  # the table exercises both answers


POLICY_FAILURES = {
    "raises": "package t\n\nimport rego.v1\n\nallow if { 1 / count(input.parsed_query) > 0 }\n",
    "undefined": "package t\n\nimport rego.v1\n\nallow if input.never\n",
    "yes": 'package t\n\nimport rego.v1\n\nallow := {"allowed": "yes"}\n',
    "number": "package t\n\nimport rego.v1\n\nallow := 1\n",
}


@pytest.mark.parametrize("case", sorted(POLICY_FAILURES))
async def test_no_decision_fails_closed_on_both_engines(tmp_path, case):
    (tmp_path / "t.rego").write_text(POLICY_FAILURES[case])
    engine = EmbeddedEngine(tmp_path)
    engine.load()
    fake = await FakeOpa(tmp_path).start()
    try:
        for authorizer in (PolicyAuthorizer(engine, default_query="data.t.allow"),
                           remote(fake.url, default_query="data.t.allow")):
            with pytest.raises(AuthzUnavailable) as caught:
                await authorizer.check(request_info(), ROUTE, exchange())
            assert caught.value.status == 503
    finally:
        await fake.close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_remote_opa_down_hung_or_failing_is_503(opa):
    down = remote(f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(AuthzUnavailable, match="unreachable"):
        await down.check(request_info(), ROUTE, exchange())
    opa.delay_s = 2.0
    hung = remote(opa.url, timeout_s=0.1)
    with pytest.raises(AuthzUnavailable, match="did not answer within 100 ms"):
        await hung.check(request_info(), ROUTE, exchange())
    opa.delay_s, opa.status = 0.0, 500
    with pytest.raises(AuthzUnavailable, match="500"):
        await hung.check(request_info(), ROUTE, exchange())
    for authorizer in (down, hung):
        await authorizer.close()


async def test_deny_is_a_decision_not_an_error(policies):
    decision = await embedded(policies).check(request_info(method="DELETE"), route(authz_query=RESULT), exchange())
    assert (decision.allowed, decision.http_status, decision.body) == (False, 403, "forbidden by policy")


async def test_failure_mode_allow_allows_and_logs(tmp_path):
    stream = io.StringIO()
    authorizer = remote(f"http://127.0.0.1:{closed_port()}", decision_log=DecisionLog(stream=stream))
    decision = await authorizer.check(request_info(), route(authz_failure_mode_allow=True), exchange())
    assert decision.allowed
    authorizer.decision_log.flush()
    line = json.loads(stream.getvalue())
    assert line["result"] == "error" and "failure_mode_allow" in line["reason"] and line["http_status"] == 200
    await authorizer.close()


async def test_dry_run_allows_but_logs_the_real_answer(policies):
    stream = io.StringIO()
    authorizer = embedded(policies, decision_log=DecisionLog(stream=stream), dry_run=True)
    decision = await authorizer.check(request_info(method="DELETE"), ROUTE, exchange())
    assert decision.allowed and decision.dry_run
    assert stream.getvalue() == ""  # batched: written by the decision-log task, not on the request path
    authorizer.decision_log.flush()
    line = json.loads(stream.getvalue())
    assert (line["result"], line["http_status"], line["dry_run"]) == ("deny", 403, True)
    per_route = embedded(policies)
    assert (await per_route.check(request_info(method="DELETE"), route(authz_dry_run=True), exchange())).allowed
    assert not (await per_route.check(request_info(method="DELETE"), ROUTE, exchange())).allowed


async def test_decision_log_line_carries_trace_and_redacts_secrets(policies):
    stream = io.StringIO()
    authorizer = embedded(policies, decision_log=DecisionLog(stream=stream, redact_headers=("authorization", "cookie")))
    info = request_info(headers=(("authorization", "Bearer secret-token"), ("cookie", "sid=secret"),
                                 ("user-agent", "probe/1")))
    decision = await authorizer.check(info, ROUTE, exchange(info))
    authorizer.decision_log.flush()
    line = json.loads(stream.getvalue())
    assert line["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736" and line["span_id"] == "00f067aa0ba902b7"
    assert line["decision_id"] == decision.decision_id
    assert (line["route"], line["principal"], line["method"], line["path"]) == ("api", CLIENT_ID, "GET", "/api/orders")
    assert line["result"] == "allow" and line["revision"] == decision.policy_revision != ""
    assert line["headers"] == {"authorization": "[REDACTED]", "cookie": "[REDACTED]", "user-agent": "probe/1"}
    assert "secret" not in stream.getvalue()
    assert isinstance(line["duration_us"], int) and line["timestamp"].endswith("+00:00")


async def test_cache_answers_repeats_and_never_stores_errors(policies, opa):
    stream = io.StringIO()
    authorizer = remote(opa.url, decision_log=DecisionLog(stream=stream),
                        caches={"api": CacheSettings(ttl_s=60, max_entries=10, headers=("x-tenant",))})
    first = await authorizer.check(request_info(headers=(("x-tenant", "a"),)), ROUTE, exchange())
    again = await authorizer.check(request_info(headers=(("x-tenant", "a"),)), ROUTE, exchange())
    assert first.allowed and again.allowed and first.decision_id != again.decision_id
    assert len(opa.requests) == 1
    await authorizer.check(request_info(headers=(("x-tenant", "b"),)), ROUTE, exchange())
    await authorizer.check(request_info(path="/api/other"), ROUTE, exchange())
    assert len(opa.requests) == 3
    authorizer.decision_log.flush()
    assert [json.loads(line)["cached"] for line in stream.getvalue().splitlines()] == [False, True, False, False]
    opa.status = 500
    for _ in range(2):
        with pytest.raises(AuthzUnavailable):
            await authorizer.check(request_info(path="/api/failing"), ROUTE, exchange())
    assert len(opa.requests) == 5
    await authorizer.close()


async def test_cache_expires(policies):
    now = [0.0]
    engine = EmbeddedEngine(policies.path)
    engine.load()
    authorizer = PolicyAuthorizer(engine, caches={"api": CacheSettings(ttl_s=5, max_entries=1)},
                                  monotonic=lambda: now[0])
    await authorizer.check(request_info(), ROUTE, exchange())
    await authorizer.check(request_info(), ROUTE, exchange())
    cache = authorizer.cache("api")
    assert cache is not None and (cache.hits, cache.misses) == (1, 1)
    now[0] = 6.0
    await authorizer.check(request_info(), ROUTE, exchange())
    assert (cache.hits, cache.misses) == (1, 2)
    await authorizer.check(request_info(path="/api/x"), ROUTE, exchange())
    assert len(cache) == 1  # max_entries evicts the oldest


async def test_ambiguous_path_is_refused_before_any_policy(policies):
    with pytest.raises(BadRequest):
        await embedded(policies).check(request_info(path="/api/..%2Fadmin"), ROUTE, exchange())


async def test_remote_opa_over_tls_is_verified_against_the_configured_ca(policies, ca, tmp_path):
    from mesh_gateway.identity.tls import server_context
    from tests.support import issue

    creds = issue(ca, "spiffe://mesh.local/ns/default/sa/opa")
    fake = await FakeOpa(policies.path, tls=server_context(creds.cert_chain_pem, creds.key_pem, client_auth="none",
                                                           client_ca_pem=None)).start()
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(ca.bundle_pem)
    trusted = PolicyAuthorizer(OpaClient(fake.url, timeout_s=2, ca_file=bundle))
    untrusted = PolicyAuthorizer(OpaClient(fake.url, timeout_s=2))  # system roots do not know our CA
    try:
        assert fake.url.startswith("https://")
        assert (await trusted.check(request_info(), ROUTE, exchange())).allowed
        with pytest.raises(AuthzUnavailable, match="unreachable"):
            await untrusted.check(request_info(), ROUTE, exchange())
        assert len(fake.requests) == 1
    finally:
        await trusted.close()
        await untrusted.close()
        await fake.close()


async def test_decision_ids_are_unique_and_uuid_shaped_with_the_log_on_or_off(policies):
    import uuid

    ids = []
    for decision_log in (DecisionLog("off"), DecisionLog(stream=io.StringIO())):
        authorizer = embedded(policies, decision_log=decision_log)
        for info in (request_info(), request_info(method="DELETE"), request_info(path="/apix")):
            decision = await authorizer.check(info, ROUTE, exchange(info))
            assert decision.engine == "embedded" and decision.policy_revision != ""
            ids.append(decision.decision_id)
        await authorizer.close()
    assert len(set(ids)) == len(ids)
    assert all(str(uuid.UUID(decision_id)) == decision_id for decision_id in ids)
