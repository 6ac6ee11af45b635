"""Metrics and access-log units: injected clocks, real files, the prometheus text parser."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh_gateway import config as cfg
from mesh_gateway.edges.admin_views import REDACTED, redact
from mesh_gateway.errors import AuthzUnavailable, UpstreamIdentityMismatch
from mesh_gateway.model import Decision, Endpoint, PeerCert, RequestInfo, Route, RouteMatch, SpiffeId
from mesh_gateway.pipeline import Exchange
from mesh_gateway.telemetry.logs import AccessLog
from mesh_gateway.telemetry.metrics import MeteredAuthorizer, Metrics

ROUTE = Route("orders", RouteMatch(path="/orders"), "orders-svc")


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def exchange(path: str = "/orders/7", query: str = "token=abc", status: int = 200) -> Exchange:
    info = RequestInfo(method="POST", path=path, query=query, host="shop.example", scheme="https", headers=(),
                       client_address="10.0.0.9", client_port=5000, request_id="req-1", listener="public",
                       peer=PeerCert(SpiffeId.parse("spiffe://mesh.local/sa/client")))
    ex = Exchange(info, route=ROUTE, status=status, bytes_in=10, bytes_out=20,
                  endpoint=Endpoint("10.1.1.1", 8443, SpiffeId.parse("spiffe://mesh.local/sa/orders")),
                  decision=Decision(allowed=True, decision_id="dec-9"))
    return ex


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.exposition().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_discovery_age_grows_with_the_clock_and_resets_on_update():
    clock = Clock()
    metrics = Metrics(clock=clock)
    metrics.discovery_updated(["orders", "users"])
    clock.now += 42
    metrics.discovery_updated(["users"])
    clock.now += 8
    got = samples(metrics)
    assert got[("mesh_gateway_discovery_last_update_age_seconds", (("service", "orders"),))] == 50
    assert got[("mesh_gateway_discovery_last_update_age_seconds", (("service", "users"),))] == 8
    metrics.discovery_forget("orders")
    assert ("mesh_gateway_discovery_last_update_age_seconds", (("service", "orders"),)) not in samples(metrics)


def test_cert_expiry_is_read_at_scrape_time():
    clock = Clock()
    metrics = Metrics(clock=clock)
    not_after = [clock.now + 3600]
    metrics.cert_expiry_source("gateway", lambda: not_after[0])
    clock.now += 600
    assert samples(metrics)[("mesh_gateway_cert_expiry_seconds", (("kind", "gateway"),))] == 3000
    not_after[0] = clock.now + 7200  # rotated
    assert samples(metrics)[("mesh_gateway_cert_expiry_seconds", (("kind", "gateway"),))] == 7200


def test_feature_counters_use_low_cardinality_labels():
    metrics = Metrics()
    metrics.cert_rotated("success")
    metrics.cert_rotated("failure")
    metrics.tls_handshake_error("public")
    metrics.upstream_ejected("orders-svc")
    metrics.upstream_connections("orders-svc", 2)
    metrics.upstream_connections("orders-svc", -1)
    ex = exchange()
    ex.error, ex.retries, ex.status = UpstreamIdentityMismatch("bad san"), 2, 502
    metrics.request_done(ex, 0.2)
    ex.info = RequestInfo(method="BREW", path="/x", query="", host="h", scheme="https", headers=(),
                          client_address="", client_port=0, request_id="r")
    metrics.request_done(ex, 0.1)
    got = samples(metrics)
    assert got[("mesh_gateway_cert_rotations_total", (("result", "success"),))] == 1
    assert got[("mesh_gateway_tls_handshake_errors_total", (("listener", "public"),))] == 1
    assert got[("mesh_gateway_upstream_ejections_total", (("service", "orders-svc"),))] == 1
    assert got[("mesh_gateway_upstream_active_connections", (("service", "orders-svc"),))] == 1
    assert got[("mesh_gateway_upstream_retries_total", (("service", "orders-svc"),))] == 4
    assert got[("mesh_gateway_upstream_connect_errors_total",
                (("reason", "UpstreamIdentityMismatch"), ("service", "orders-svc")))] == 2
    assert got[("mesh_gateway_requests_total", (("code", "502"), ("method", "OTHER"), ("route", "orders")))] == 1


async def test_metered_authorizer_counts_allow_deny_and_error():
    metrics = Metrics()

    class Policy:
        async def check(self, info: RequestInfo, route: Route, exchange: Exchange) -> Decision:
            if info.path == "/down":
                raise AuthzUnavailable("engine gone")
            return Decision(allowed=info.path == "/ok")

    authorizer = MeteredAuthorizer(Policy(), metrics)
    for path in ("/ok", "/no", "/ok"):
        ex = exchange(path)
        await authorizer.check(ex.info, ROUTE, ex)
    ex = exchange("/down")
    with pytest.raises(AuthzUnavailable):
        await authorizer.check(ex.info, ROUTE, ex)
    got = samples(metrics)
    assert [got[("mesh_gateway_authz_decisions_total", (("result", r),))] for r in ("allow", "deny", "error")] == [
        2, 1, 1]
    assert got[("mesh_gateway_authz_duration_seconds_count", (("result", "error"),))] == 1


def test_access_log_lines_are_buffered_until_flush():
    out = io.StringIO()
    log = AccessLog(cfg.AccessLog(buffer_bytes=1_000_000), stream=out, clock=Clock(1_700_000_000.5))
    log.record(exchange(), 0.0123456)
    assert out.getvalue() == ""
    log.flush()
    [line] = [json.loads(x) for x in out.getvalue().splitlines()]
    assert line == {
        "time": "2023-11-14T22:13:20.500Z", "request_id": "req-1", "trace_id": None, "span_id": None,
        "listener": "public", "client": "10.0.0.9", "peer": "spiffe://mesh.local/sa/client", "method": "POST",
        "host": "shop.example", "path": "/orders/7", "protocol": "HTTP/1.1", "route": "orders",
        "upstream": "10.1.1.1:8443", "status": 200, "bytes_in": 10, "bytes_out": 20, "duration_ms": 12.346,
        "decision_id": "dec-9", "error": None}


def test_access_log_writes_when_the_buffer_fills_and_escapes_hostile_input(tmp_path: Path):
    path = tmp_path / "logs" / "access.log"
    path.parent.mkdir()
    log = AccessLog(cfg.AccessLog(path=str(path), buffer_bytes=0, include_query=True))
    log.record(exchange(path='/x"\n{"status":1}'), 0.001)
    lines = path.read_text().splitlines()
    log.close()
    [line] = [json.loads(x) for x in lines]
    assert line["path"] == '/x"\n{"status":1}' and line["status"] == 200 and line["query"] == "token=abc"
    assert path.stat().st_mode & 0o007 == 0, "the world may not read the access log"


def test_access_log_path_that_cannot_be_opened_names_the_key(tmp_path: Path):
    with pytest.raises(cfg.ConfigError, match=r"telemetry\.access_log\.path"):
        AccessLog(cfg.AccessLog(path=str(tmp_path / "missing-dir" / "a.log")))


def test_relative_access_log_path_is_relative_to_the_config_file(tmp_path: Path):
    (tmp_path / "gw.yaml").write_text(
        "trust_domain: mesh.local\nlisteners: [{name: p, address: '127.0.0.1:0'}]\n"
        "identity: {spiffe_id: 'spiffe://mesh.local/gw'}\ntelemetry: {access_log: {path: logs/a.log}}\n")
    assert cfg.load(tmp_path / "gw.yaml").telemetry.access_log.path == str(tmp_path / "logs" / "a.log")


def test_redact_hides_secret_named_keys_and_masked_values():
    given = {"tracing": {"headers": {"x-api-key": "**********"}}, "consul": {"token": "abc", "address": "x"},
             "opa": {"password": "", "items": [{"api_key": "k"}]}}
    assert redact(given) == {"tracing": {"headers": {"x-api-key": REDACTED}},
                             "consul": {"token": REDACTED, "address": "x"},
                             "opa": {"password": "", "items": [{"api_key": REDACTED}]}}
