"""Authorization through the real gateway: TLS from our CA, real Rego, a real upstream, the OPA fake."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mesh_gateway import config as cfg
from mesh_gateway.demo.upstream import RunningUpstream, start_upstream
from mesh_gateway.identity.ca import init_ca
from mesh_gateway.process import StartupError
from tests.authz_helpers import CLIENT_ID, CONSOLE_ID, shipped_policies
from tests.fakes.opa import FakeOpa
from tests.support import WEB_ID, admin_url, client_ssl, gateway_config, issue, running, url

# OPA's "Envoy with SPIRE" example policy, verbatim (Rego v0, as published).
OPA_ENVOY_SPIRE_EXAMPLE = '''package envoy.authz

import input.attributes.request.http as http_request
import input.attributes.source.address as source_address

default allow = false

# allow Web service to access Backend service
allow {
    http_request.path == "/good/backend"
    http_request.method == "GET"
    svc_spiffe_id == "spiffe://domain.test/web-server"
}

# allow Backend service access from localhost
allow {
    source_address.Address.SocketAddress.address == "127.0.0.1"
    http_request.path == "/good/db"
    http_request.method == "GET"
}

svc_spiffe_id = client_id {
    [_, _, uri_type_san] := split(http_request.headers["x-forwarded-client-cert"], ";")
    [_, client_id] := split(uri_type_san, "=")
}
'''


def catalog(upstream: RunningUpstream, spiffe_id: str = WEB_ID) -> dict[str, list[dict[str, object]]]:
    return {"web": [{"address": upstream.host, "port": upstream.port, "spiffe_id": spiffe_id}]}


async def until(condition: Callable[[], Any], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


async def call(client: aiohttp.ClientSession, method: str, target: str, ssl: Any,
               **kw: Any) -> tuple[int, dict[str, str], bytes]:
    async with client.request(method, target, ssl=ssl, **kw) as resp:
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.read()


async def test_unchanged_opa_envoy_example_authorizes_by_spiffe_id_and_method(tmp_path):
    ca = init_ca(tmp_path / "ca", "domain.test")
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "envoy.rego").write_text(OPA_ENVOY_SPIRE_EXAMPLE)
    backend = await start_upstream("backend", issue(ca, "spiffe://domain.test/backend-server"))
    config = cfg.parse({
        "trust_domain": "domain.test",
        "listeners": [{"name": "public", "address": "127.0.0.1:0", "tls": {"client_auth": "optional"}}],
        "identity": {"ca_dir": str(tmp_path / "ca"), "spiffe_id": "spiffe://domain.test/gateway",
                     "dns": ["localhost", "127.0.0.1"]},
        "catalog": {"static": {"backend": [{"address": backend.host, "port": backend.port,
                                            "spiffe_id": "spiffe://domain.test/backend-server"}]}},
        "routes": [{"name": "backend", "match": {"path_prefix": "/"}, "service": "backend"}],
        "admin": {"address": "127.0.0.1:0"},
        "authz": {"policies": str(policies), "rego_version": "v0", "decision_log": {"sink": "off"}},
    })
    web = client_ssl(ca.bundle_pem, issue(ca, "spiffe://domain.test/web-server"))
    other = client_ssl(ca.bundle_pem, issue(ca, "spiffe://domain.test/other"))
    anonymous = client_ssl(ca.bundle_pem)
    try:
        async with running(config) as gw, aiohttp.ClientSession() as client:
            status, _, body = await call(client, "GET", url(gw, "/good/backend"), web)
            assert status == 200 and json.loads(body)["service"] == "backend"
            assert (await call(client, "POST", url(gw, "/good/backend"), web))[0] == 403
            assert (await call(client, "GET", url(gw, "/good/backend"), other))[0] == 403
            assert (await call(client, "GET", url(gw, "/good/backend"), anonymous))[0] == 403
            # The localhost rule reads a field Envoy's input never had; it must not open /good/db.
            assert (await call(client, "GET", url(gw, "/good/db"), web))[0] == 403
    finally:
        await backend.close()


@pytest.fixture
def policies(tmp_path: Path):  # type: ignore[no-untyped-def]
    return shipped_policies(tmp_path)


def authz_config(policies: Any, **extra: Any) -> dict[str, Any]:
    return {"policies": str(policies.path), "decision_log": {"sink": "off"}, "reload_poll_s": 0.05, **extra}


async def test_shipped_policy_decision_object_through_the_gateway(ca, ca_dir, web_upstream, client_creds, policies):
    config = gateway_config(ca_dir, catalog(web_upstream),
                            authz=authz_config(policies, query="data.envoy.authz.result"))
    client_tls = client_ssl(ca.bundle_pem, client_creds)
    console_tls = client_ssl(ca.bundle_pem, issue(ca, CONSOLE_ID))
    async with running(config) as gw, aiohttp.ClientSession() as client:
        status, headers, body = await call(client, "GET", url(gw, "/api/orders"), client_tls)
        assert status == 200
        assert json.loads(body)["headers"]["x-authz-principal"] == CLIENT_ID
        assert headers["x-authz-policy"] == "envoy.authz"
        status, _, body = await call(client, "DELETE", url(gw, "/api/orders/1"), client_tls)
        assert (status, body) == (403, b"forbidden by policy")
        status, headers, _ = await call(client, "GET", url(gw, "/admin/users"), console_tls)
        assert status == 401 and headers["www-authenticate"].startswith("Bearer")
        admin = {"authorization": f"Bearer {policies.token(['admin'])}"}
        assert (await call(client, "GET", url(gw, "/admin/users"), console_tls, headers=admin))[0] == 200
        viewer = {"authorization": f"Bearer {policies.token(['viewer'])}"}
        assert (await call(client, "GET", url(gw, "/admin/users"), console_tls, headers=viewer))[0] == 403


@pytest.mark.parametrize(("path", "status"), [
    ("/api/./orders", 200),
    ("/api/%6Frders", 200),
    ("/api/%2e%2e/admin", 403),
    ("/api/%2E%2E/admin/users", 403),
    ("//admin", 403),
    ("/ADMIN", 403),
    ("/Admin/users", 403),
    ("/admin;x=1", 403),
    ("/api/..;/admin", 403),
    ("/api/..%2fadmin", 400),
    ("/api/..%5cadmin", 400),
])
async def test_path_bypass_attempts(ca, ca_dir, web_upstream, client_creds, policies, path, status):
    """The client may read /api but has no grant on /admin: no spelling of /admin gets it through."""
    config = gateway_config(ca_dir, catalog(web_upstream), authz=authz_config(policies))
    async with running(config) as gw, aiohttp.ClientSession() as client:
        got, _, _ = await call(client, "GET", url(gw, "") + path, client_ssl(ca.bundle_pem, client_creds))
        assert got == status


async def test_remote_opa_engine_through_the_gateway(ca, ca_dir, web_upstream, client_creds, policies):
    opa = await FakeOpa(policies.path).start()
    config = gateway_config(
        ca_dir, catalog(web_upstream),
        routes=[{"name": "strict", "match": {"path_prefix": "/api"}, "service": "web"},
                {"name": "lenient", "match": {"path_prefix": "/status"}, "service": "web",
                 "authz": {"failure_mode_allow": True}},
                {"name": "open", "match": {"path_prefix": "/public"}, "service": "web", "authz": "disabled"}],
        authz={"engine": "opa", "opa": {"url": opa.url, "timeout_ms": 150}, "decision_log": {"sink": "off"}})
    tls = client_ssl(ca.bundle_pem, client_creds)
    try:
        async with running(config) as gw, aiohttp.ClientSession() as client:
            assert (await call(client, "GET", url(gw, "/api/orders"), tls))[0] == 200
            assert (await call(client, "DELETE", url(gw, "/api/orders"), tls))[0] == 403
            assert (await call(client, "GET", url(gw, "/public/x"), tls))[0] == 200
            opa.delay_s = 1.0  # hung past the 150 ms timeout
            status, _, body = await call(client, "GET", url(gw, "/api/orders"), tls)
            assert status == 503 and json.loads(body)["error"] == "authorization unavailable"
            assert (await call(client, "GET", url(gw, "/status"), tls))[0] == 200
            await opa.close()  # down
            assert (await call(client, "GET", url(gw, "/api/orders"), tls))[0] == 503
            assert (await call(client, "GET", url(gw, "/status"), tls))[0] == 200
            assert (await call(client, "GET", url(gw, "/public/x"), tls))[0] == 200
    finally:
        await opa.close()


async def test_policy_reads_the_json_body_and_the_body_still_reaches_upstream(ca, ca_dir, web_upstream, client_creds,
                                                                            tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "orders.rego").write_text(
        "package envoy.authz\n\nimport rego.v1\n\ndefault allow := false\n\n"
        "allow if { not input.truncated_body; input.parsed_body.amount < 100 }\n")
    config = gateway_config(ca_dir, catalog(web_upstream),
                            routes=[{"name": "orders", "match": {"path_prefix": "/"}, "service": "web",
                                     "authz": {"include_body_bytes": 64}}],
                            authz={"policies": str(tmp_path / "p"), "decision_log": {"sink": "off"}})
    tls = client_ssl(ca.bundle_pem, client_creds)
    small = json.dumps({"amount": 5, "note": "x" * 20}).encode()
    async with running(config) as gw, aiohttp.ClientSession() as client:
        status, _, body = await call(client, "POST", url(gw, "/orders"), tls, data=small,
                                     headers={"content-type": "application/json"})
        assert (status, body) == (200, small)
        big = json.dumps({"amount": 5, "note": "x" * 5000}).encode()
        assert (await call(client, "POST", url(gw, "/orders"), tls, data=big,
                           headers={"content-type": "application/json"}))[0] == 403
        expensive = json.dumps({"amount": 500}).encode()
        assert (await call(client, "POST", url(gw, "/orders"), tls, data=expensive,
                           headers={"content-type": "application/json"}))[0] == 403


async def test_hot_reload_under_load_without_a_single_5xx(ca, ca_dir, web_upstream, client_creds, policies):
    config = gateway_config(ca_dir, catalog(web_upstream), authz=authz_config(policies))
    tls = client_ssl(ca.bundle_pem, client_creds)
    statuses: list[int] = []
    stop = asyncio.Event()
    async with running(config) as gw, aiohttp.ClientSession() as client:
        async def view() -> dict[str, Any]:
            async with client.get(admin_url(gw, "/policies")) as resp:
                return dict(await resp.json())

        async def load() -> None:
            while not stop.is_set():
                for method, path in (("GET", "/api/orders"), ("DELETE", "/api/orders/1")):
                    statuses.append((await call(client, method, url(gw, path), tls))[0])

        first = (await view())["revision"]
        workers = [asyncio.get_running_loop().create_task(load()) for _ in range(4)]
        try:
            await until(lambda: len(statuses) > 20)
            data = json.loads((policies.path / "data.json").read_text())
            data["mesh"]["grants"].append({"principal": CLIENT_ID, "methods": ["DELETE"], "prefixes": ["/api"]})
            (policies.path / "data.json").write_text(json.dumps(data))
            await until(lambda: statuses[-8:].count(403) == 0 and len(statuses) > 40)
            second = (await view())["revision"]
            assert second != first
            (policies.path / "broken.rego").write_text("package envoy.authz\n\nallow if {\n")

            async def rejected() -> bool:
                state = await view()
                return bool(state["last_error"]) and state["revision"] == second
            await until(rejected)
            served_before = len(statuses)
            await until(lambda: len(statuses) > served_before + 40)
        finally:
            stop.set()
            await asyncio.gather(*workers)
    assert statuses and all(status < 500 for status in statuses), sorted(set(statuses))
    assert statuses[-40:].count(200) == 40  # the last good set keeps serving: GET and the newly granted DELETE
    assert 403 in statuses  # DELETE was denied before the valid change


async def test_broken_policy_set_stops_the_gateway_from_starting(ca_dir, ca, web_upstream, tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.rego").write_text("package envoy.authz\n\nallow if {\n")
    config = gateway_config(ca_dir, catalog(web_upstream), authz={"policies": str(tmp_path / "bad")})
    with pytest.raises(StartupError, match=r"x\.rego"):
        async with running(config):
            pass


async def test_admin_policies_view_and_decision_log_file(ca, ca_dir, web_upstream, client_creds, policies, tmp_path):
    log_file = tmp_path / "logs" / "decisions.jsonl"
    config = gateway_config(ca_dir, catalog(web_upstream),
                            authz=authz_config(policies, decision_log={"sink": str(log_file)}))
    async with running(config) as gw, aiohttp.ClientSession() as client:
        await call(client, "GET", url(gw, "/api/orders"), client_ssl(ca.bundle_pem, client_creds),
                   headers={"authorization": "Bearer top-secret"})
        async with client.get(admin_url(gw, "/policies")) as resp:
            view = await resp.json()
    assert view["engine"] == "embedded" and len(view["revision"]) == 16 and view["last_error"] is None
    assert view["query"] == "data.envoy.authz.allow" and view["directory"] == str(policies.path)
    line = json.loads(log_file.read_text().splitlines()[0])
    assert (line["result"], line["route"], line["principal"]) == ("allow", "web", CLIENT_ID)
    assert line["revision"] == view["revision"] and line["headers"]["authorization"] == "[REDACTED]"
    assert "top-secret" not in log_file.read_text()


async def test_decision_log_carries_the_trace_id_of_the_request(ca, ca_dir, web_upstream, client_creds, policies,
                                                                tmp_path):
    log_file = tmp_path / "decisions.jsonl"
    config = gateway_config(ca_dir, catalog(web_upstream),
                            authz=authz_config(policies, decision_log={"sink": str(log_file)}))
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    tls = client_ssl(ca.bundle_pem, client_creds)
    async with running(config) as gw, aiohttp.ClientSession() as client:
        for method in ("GET", "DELETE"):
            await call(client, method, url(gw, "/api/orders"), tls,
                       headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [line["result"] for line in lines] == ["allow", "deny"]
    for line in lines:
        assert line["trace_id"] == trace_id
        assert len(line["span_id"]) == 16 and line["span_id"] != "00f067aa0ba902b7"  # the gateway's own span


async def test_demo_gateway_authorizes_the_demo_client_only(tmp_path):
    from mesh_gateway.commands.demo import CLIENT_ID as DEMO_CLIENT
    from mesh_gateway.commands.demo import UPSTREAM_ID, demo_config

    ca = init_ca(tmp_path / "ca", "mesh.local")
    upstream = await start_upstream("web", issue(ca, UPSTREAM_ID))
    config = demo_config(tmp_path / "ca", "127.0.0.1:0", upstream.port, "127.0.0.1:0")
    demo_client = client_ssl(ca.bundle_pem, issue(ca, DEMO_CLIENT))
    try:
        async with running(config) as gw, aiohttp.ClientSession() as client:
            assert (await call(client, "GET", url(gw, "/hello"), demo_client))[0] == 200
            assert (await call(client, "POST", url(gw, "/hello"), demo_client, data=b"x"))[0] == 403
            assert (await call(client, "GET", url(gw, "/hello"), client_ssl(ca.bundle_pem)))[0] == 403
    finally:
        await upstream.close()


async def test_body_over_the_route_cap_while_buffered_for_the_policy_is_413(ca, ca_dir, web_upstream, client_creds,
                                                                           tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "allow.rego").write_text("package envoy.authz\n\nallow := true\n")
    config = gateway_config(ca_dir, catalog(web_upstream),
                            routes=[{"name": "orders", "match": {"path_prefix": "/"}, "service": "web",
                                     "max_body_bytes": 1000, "authz": {"include_body_bytes": 1000}}],
                            authz={"policies": str(tmp_path / "p"), "decision_log": {"sink": "off"}})

    async def chunked():  # no content-length, so the cap is found while reading
        for _ in range(10):
            yield b"x" * 500

    async with running(config) as gw, aiohttp.ClientSession() as client:
        status, _, _ = await call(client, "POST", url(gw, "/orders"), client_ssl(ca.bundle_pem, client_creds),
                                  data=chunked())
    assert status == 413
