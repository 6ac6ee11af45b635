"""The `authz:` config section and per-route `authz:` options: defaults, shorthands, errors naming the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mesh_gateway import config as cfg
from mesh_gateway.discovery.static import routes_from_config


def base(**extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "trust_domain": "mesh.local",
        "listeners": [{"name": "public", "address": "127.0.0.1:8443"}],
        "identity": {"spiffe_id": "spiffe://mesh.local/ns/default/sa/gateway"},
        "catalog": {"static": {"web": [{"address": "127.0.0.1", "port": 9001, "tls": "plain"}]}},
        "routes": [{"name": "web", "service": "web"}],
    }
    data.update(extra)
    return data


def errors(data: dict[str, Any]) -> list[str]:
    with pytest.raises(cfg.ConfigError) as caught:
        cfg.parse(data)
    return caught.value.errors


def test_authz_is_off_unless_configured_and_defaults_are_safe():
    assert cfg.parse(base()).authz is None
    authz = cfg.parse(base(authz={})).authz
    assert authz is not None
    assert (authz.engine, authz.query, authz.rego_version, authz.dry_run) == ("embedded", "data.envoy.authz.allow",
                                                                            "v1", False)
    assert authz.decision_log.redact_headers == ("authorization", "cookie", "proxy-authorization", "set-cookie")


@pytest.mark.parametrize("query", ["envoy.authz.allow", "envoy/authz/allow", "data.envoy.authz.allow"])
def test_query_spellings(query):
    assert cfg.parse(base(authz={"query": query})).authz.query == "data.envoy.authz.allow"  # type: ignore[union-attr]


@pytest.mark.parametrize(("authz", "message"), [
    ({"engine": "opa"}, "authz.opa: required when engine is 'opa'"),
    ({"engine": "opa", "opa": {"url": "127.0.0.1:8181"}}, "authz.opa.url"),
    ({"engine": "opa", "opa": {"url": "http://127.0.0.1:8181", "timeout_ms": 0}}, "authz.opa.timeout_ms"),
    ({"query": ""}, "authz.query: expected a rule path"),
    ({"query": "envoy.authz[0]"}, "authz.query"),
    ({"reload_poll_s": 5}, "authz.reload_poll_s"),
    ({"rego_version": "v2"}, "authz.rego_version"),
    ({"bogus": 1}, "authz.bogus: unknown key"),
])
def test_authz_errors_name_the_key(authz, message):
    assert any(line.startswith(message) for line in errors(base(authz=authz))), errors(base(authz=authz))


def test_route_authz_options_reach_the_route_policy():
    config = cfg.parse(base(authz={}, routes=[
        {"name": "a", "service": "web", "authz": "disabled"},
        {"name": "b", "service": "web", "authz": {"failure_mode_allow": True, "dry_run": True,
                                                  "query": "orders/result", "include_body_bytes": 512}},
        {"name": "c", "service": "web", "authz": {"cache": {"ttl_s": 2, "headers": ["X-Tenant"]}}},
    ]))
    a, b, c = routes_from_config(config).routes
    assert not a.policy.authz_enabled
    assert (b.policy.authz_failure_mode_allow, b.policy.authz_dry_run, b.policy.authz_query,
            b.policy.authz_include_body_bytes) == (True, True, "data.orders.result", 512)
    assert c.policy.authz_enabled and not c.policy.authz_failure_mode_allow
    assert config.routes[2].authz.cache is not None and config.routes[2].authz.cache.headers == ("x-tenant",)


@pytest.mark.parametrize(("route_authz", "message"), [
    ({"include_body_bytes": 16, "cache": {}}, "routes[0].authz: cache cannot be combined with include_body_bytes"),
    ({"include_body_bytes": 2 * 1024 * 1024}, "routes[0].authz.include_body_bytes"),
    ({"cache": {"ttl_s": 0}}, "routes[0].authz.cache.ttl_s"),
    ("enabled", "routes[0].authz"),
])
def test_route_authz_errors_name_the_key(route_authz, message):
    lines = errors(base(routes=[{"name": "web", "service": "web", "authz": route_authz}]))
    assert any(line.startswith(message) for line in lines), lines


def test_paths_are_relative_to_the_config_file(tmp_path: Path):
    (tmp_path / "gateway.yaml").write_text(
        "trust_domain: mesh.local\n"
        "listeners: [{name: public, address: '127.0.0.1:8443'}]\n"
        "identity: {spiffe_id: 'spiffe://mesh.local/ns/default/sa/gateway'}\n"
        "authz:\n  policies: rego\n  opa: {url: 'https://opa:8181', ca_file: ca.pem}\n"
        "  decision_log: {sink: logs/decisions.jsonl}\n")
    authz = cfg.load(tmp_path / "gateway.yaml").authz
    assert authz is not None and authz.opa is not None
    assert authz.policies == tmp_path / "rego"
    assert authz.opa.ca_file == tmp_path / "ca.pem"
    assert authz.decision_log.sink == str(tmp_path / "logs" / "decisions.jsonl")
