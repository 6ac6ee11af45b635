"""Telemetry through the real gateway: client → gateway (TLS) → mTLS upstream, spans to an in-process OTLP receiver."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh_gateway.demo.upstream import RunningUpstream
from mesh_gateway.model import Decision, RequestInfo, Route
from tests.fakes.otlp import OtlpReceiver
from tests.support import CLIENT_ID, WEB_ID, admin_url, client_ssl, gateway_config, running, url

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class PathPolicy:
    """A real (if tiny) Authorizer: denies /deny, allows the rest, and reports an id and revision like OPA would."""

    def __init__(self) -> None:
        self.count = 0

    async def check(self, info: RequestInfo, route: Route, exchange: Any) -> Decision:
        self.count += 1
        return Decision(allowed=not info.path.startswith("/deny"), decision_id=f"d-{self.count}",
                        policy_revision="rev-7", engine="test")


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()


def config_for(ca_dir: Path, upstream: RunningUpstream, endpoint: str, log_path: Path, **tracing: Any):
    settings = {"exporter": "otlp_grpc", "endpoint": endpoint, "export_delay_s": 0.05, "export_timeout_s": 2,
                "shutdown_timeout_s": 2, **tracing}
    return gateway_config(
        ca_dir, {"web": [{"address": upstream.host, "port": upstream.port, "spiffe_id": WEB_ID}]},
        telemetry={"service_name": "edge-test", "tracing": settings,
                   "access_log": {"path": str(log_path), "flush_interval_s": 0.05}})


async def get(client: aiohttp.ClientSession, ssl: Any, target: str, headers: dict[str, str] | None = None
              ) -> tuple[int, Any]:
    async with client.get(target, ssl=ssl, headers=headers or {}) as resp:
        body = await resp.json() if resp.content_type == "application/json" else await resp.text()
        return resp.status, body


def log_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_one_connected_trace_from_client_to_upstream(ca, ca_dir, web_upstream, client_creds, receiver,
                                                           tmp_path):
    config = config_for(ca_dir, web_upstream, receiver.endpoint, tmp_path / "access.log")
    async with running(config, authorizer=PathPolicy()) as gw, aiohttp.ClientSession() as client:
        status, report = await get(client, client_ssl(ca.bundle_pem, client_creds), url(gw, "/orders/1?token=x"),
                                   {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})
        assert status == 200
        spans = await receiver.wait_for(lambda s: len(s) == 3)
    by_name = {s.name: s for s in spans}
    ingress, authz, upstream = by_name["GET web"], by_name["authz"], by_name["upstream"]
    assert {s.trace_id for s in spans} == {CLIENT_TRACE}
    assert (ingress.kind, ingress.parent_span_id) == ("server", CLIENT_SPAN)
    assert (authz.kind, authz.parent_span_id) == ("internal", ingress.span_id)
    assert (upstream.kind, upstream.parent_span_id) == ("client", ingress.span_id)
    # The service behind the gateway continues the trace under the upstream span.
    assert report["headers"]["traceparent"] == f"00-{CLIENT_TRACE}-{upstream.span_id}-01"
    assert ingress.resource["service.name"] == "edge-test"
    assert ingress.attributes["http.route"] == "web"
    assert ingress.attributes["http.response.status_code"] == 200
    assert ingress.attributes["url.path"] == "/orders/1"
    assert ingress.attributes["mesh.peer.spiffe_id"] == CLIENT_ID
    assert authz.attributes == {"mesh.authz.allowed": True, "mesh.authz.decision_id": "d-1",
                                "mesh.authz.policy_revision": "rev-7", "mesh.authz.engine": "test"}
    assert upstream.attributes["server.address"] == web_upstream.host
    assert upstream.attributes["server.port"] == web_upstream.port
    assert upstream.attributes["mesh.upstream.spiffe_id"] == WEB_ID
    assert upstream.attributes["http.response.status_code"] == 200
    [line] = log_lines(tmp_path / "access.log")
    assert (line["trace_id"], line["span_id"]) == (CLIENT_TRACE, ingress.span_id)
    assert line["path"] == "/orders/1" and "query" not in line
    assert (line["route"], line["status"], line["peer"], line["decision_id"]) == ("web", 200, CLIENT_ID, "d-1")
    assert line["upstream"] == f"{web_upstream.host}:{web_upstream.port}"
    assert line["bytes_out"] > 0 and line["duration_ms"] >= 0 and line["request_id"]


async def test_b3_from_the_client_is_honoured(ca, ca_dir, web_upstream, client_creds, receiver, tmp_path):
    config = config_for(ca_dir, web_upstream, receiver.endpoint, tmp_path / "access.log")
    async with running(config) as gw, aiohttp.ClientSession() as client:
        status, report = await get(client, client_ssl(ca.bundle_pem, client_creds), url(gw, "/"),
                                   {"b3": f"{CLIENT_TRACE}-{CLIENT_SPAN}-1"})
        assert status == 200
        spans = await receiver.wait_for(lambda s: len(s) == 3)
    ingress = next(s for s in spans if s.kind == "server")
    upstream = next(s for s in spans if s.kind == "client")
    assert (ingress.trace_id, ingress.parent_span_id) == (CLIENT_TRACE, CLIENT_SPAN)
    assert report["headers"]["traceparent"] == f"00-{CLIENT_TRACE}-{upstream.span_id}-01"
    assert "b3" not in report["headers"]


async def test_ratio_zero_exports_nothing_but_propagates(ca, ca_dir, web_upstream, client_creds, receiver, tmp_path):
    config = config_for(ca_dir, web_upstream, receiver.endpoint, tmp_path / "access.log", sampling_ratio=0)
    async with running(config) as gw, aiohttp.ClientSession() as client:
        status, report = await get(client, client_ssl(ca.bundle_pem, client_creds), url(gw, "/"))
        assert status == 200
    # stop() flushed the export queue, so anything recorded would have arrived by now.
    assert receiver.snapshot() == []
    _, trace_id, _, flags = report["headers"]["traceparent"].split("-")
    assert flags == "00"
    [line] = log_lines(tmp_path / "access.log")
    assert line["trace_id"] == trace_id


async def test_receiver_down_requests_unaffected_and_drops_counted(ca, ca_dir, web_upstream, client_creds,
                                                                  receiver, tmp_path):
    receiver.stop()
    config = config_for(ca_dir, web_upstream, receiver.endpoint, tmp_path / "access.log", export_timeout_s=0.5,
                        shutdown_timeout_s=1)
    ssl = client_ssl(ca.bundle_pem, client_creds)
    async with running(config) as gw, aiohttp.ClientSession() as client:
        for _ in range(3):
            assert (await get(client, ssl, url(gw, "/")))[0] == 200
        dropped = ("mesh_gateway_trace_spans_dropped_total", (("reason", "export_failed"),))
        # The export worker gives up on the refused collector in its own time.
        samples = await scrape_until(client, admin_url(gw, "/metrics"), lambda m: m.get(dropped, 0) >= 9)
        assert samples[dropped] == 9
        assert samples[("mesh_gateway_trace_spans_exported_total", ())] == 0


async def scrape_until(client: aiohttp.ClientSession, target: str, done: Callable[[Samples], bool],
                       timeout_s: float = 10.0) -> Samples:
    """Requests are counted once their last byte is written, which may be just after the client has read it."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = await scrape(client, target)
        if done(samples) or time.monotonic() > deadline:
            return samples
        await asyncio.sleep(0.02)


async def scrape(client: aiohttp.ClientSession, target: str) -> Samples:
    async with client.get(target) as resp:
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
        text = await resp.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_metrics_parse_and_move_with_requests(ca, ca_dir, web_upstream, client_creds, tmp_path):
    config = gateway_config(
        ca_dir, {"web": [{"address": web_upstream.host, "port": web_upstream.port, "spiffe_id": WEB_ID}]},
        routes=[{"name": "web", "match": {"path_prefix": "/"}, "service": "web"}],
        telemetry={"access_log": {"enabled": False}})
    ssl = client_ssl(ca.bundle_pem, client_creds)
    async with running(config, authorizer=PathPolicy()) as gw, aiohttp.ClientSession() as client:
        before = await scrape(client, admin_url(gw, "/metrics"))
        ok = ("mesh_gateway_requests_total", (("code", "200"), ("method", "GET"), ("route", "web")))
        assert before.get(ok, 0) == 0
        for path in ("/a", "/b", "/deny"):
            await get(client, ssl, url(gw, path))
        after = await scrape_until(client, admin_url(gw, "/metrics"),
                                   lambda m: m.get(("mesh_gateway_request_duration_seconds_count", (("route", "web"),)))
                                   == 3)
    assert after[ok] == 2
    assert after[("mesh_gateway_requests_total", (("code", "403"), ("method", "GET"), ("route", "web")))] == 1
    assert after[("mesh_gateway_request_duration_seconds_count", (("route", "web"),))] == 3
    assert after[("mesh_gateway_authz_decisions_total", (("result", "allow"),))] == 2
    assert after[("mesh_gateway_authz_decisions_total", (("result", "deny"),))] == 1
    assert after[("mesh_gateway_authz_duration_seconds_count", (("result", "allow"),))] == 2
    assert 3000 < after[("mesh_gateway_cert_expiry_seconds", (("kind", "gateway"),))] <= 3600
    assert after[("mesh_gateway_cert_expiry_seconds", (("kind", "root"),))] > 3600
    assert after[("mesh_gateway_discovery_last_update_age_seconds", (("service", "web"),))] >= 0
    assert not any("/a" in str(labels) for _, labels in after), "raw paths must never become labels"


async def test_upstream_connect_errors_are_counted(ca, ca_dir, client_creds):
    config = gateway_config(ca_dir, {"web": [{"address": "127.0.0.1", "port": 1, "spiffe_id": WEB_ID}]},
                            telemetry={"access_log": {"enabled": False}})
    async with running(config) as gw, aiohttp.ClientSession() as client:
        assert (await get(client, client_ssl(ca.bundle_pem, client_creds), url(gw, "/")))[0] == 502
        key = ("mesh_gateway_upstream_connect_errors_total", (("reason", "UpstreamConnectFailed"), ("service", "web")))
        samples = await scrape_until(client, admin_url(gw, "/metrics"), lambda m: key in m)
    assert samples[key] == 1
    assert samples[("mesh_gateway_requests_total", (("code", "502"), ("method", "GET"), ("route", "web")))] == 1


async def test_no_route_is_logged_and_counted_without_a_route_label(ca, ca_dir, web_upstream, client_creds,
                                                                      tmp_path):
    log_path = tmp_path / "access.log"
    config = gateway_config(
        ca_dir, {"web": [{"address": web_upstream.host, "port": web_upstream.port, "spiffe_id": WEB_ID}]},
        routes=[{"name": "api", "match": {"path_prefix": "/api/"}, "service": "web"}],
        telemetry={"access_log": {"path": str(log_path), "include_query": True}})
    async with running(config) as gw, aiohttp.ClientSession() as client:
        assert (await get(client, client_ssl(ca.bundle_pem, client_creds), url(gw, "/nope?q=1")))[0] == 404
        key = ("mesh_gateway_requests_total", (("code", "404"), ("method", "GET"), ("route", "(none)")))
        samples = await scrape_until(client, admin_url(gw, "/metrics"), lambda m: key in m)
    assert samples[key] == 1
    [line] = log_lines(log_path)
    assert (line["status"], line["route"], line["error"], line["query"]) == (404, None, "NotFound", "q=1")
    assert line["trace_id"] and line["upstream"] is None


async def test_config_view_redacts_secrets_and_routes_view_lists_routes(ca, ca_dir, web_upstream):
    config = gateway_config(
        ca_dir, {"web": [{"address": web_upstream.host, "port": web_upstream.port, "spiffe_id": WEB_ID}]},
        telemetry={"tracing": {"headers": {"x-api-key": "hunter2"}}, "access_log": {"enabled": False}})
    async with running(config) as gw, aiohttp.ClientSession() as client:
        async with client.get(admin_url(gw, "/config")) as resp:
            text = await resp.text()
            shown = json.loads(text)
        async with client.get(admin_url(gw, "/routes")) as resp:
            routes = await resp.json()
    assert "hunter2" not in text
    assert shown["telemetry"]["tracing"]["headers"] == {"x-api-key": "<redacted>"}
    assert shown["telemetry"]["tracing"]["sampling_ratio"] == 1.0
    assert shown["routes"][0]["name"] == "web"
    [route] = routes["routes"]
    assert (route["name"], route["service"], route["match"]["path"]) == ("web", "web", "/")


async def test_requests_refused_at_the_edge_are_logged_and_counted(ca, ca_dir, web_upstream, client_creds,
                                                                   tmp_path):
    log_path = tmp_path / "access.log"
    config = gateway_config(
        ca_dir, {"web": [{"address": web_upstream.host, "port": web_upstream.port, "spiffe_id": WEB_ID}]},
        limits={"max_request_line_bytes": 512}, telemetry={"access_log": {"path": str(log_path)}})
    async with running(config) as gw, aiohttp.ClientSession() as client:
        status, _ = await get(client, client_ssl(ca.bundle_pem, client_creds), url(gw, "/" + "a" * 600))
        assert status == 414
        key = ("mesh_gateway_requests_total", (("code", "414"), ("method", "GET"), ("route", "(none)")))
        samples = await scrape_until(client, admin_url(gw, "/metrics"), lambda m: key in m)
    assert samples[key] == 1
    [line] = log_lines(log_path)
    assert (line["status"], line["error"], line["route"]) == (414, "UriTooLong", None)
    assert line["path"] == "/" + "a" * 255 and line["trace_id"]


async def test_failed_tls_handshakes_are_counted_per_listener(ca, ca_dir, web_upstream):
    import ssl as ssl_module

    config = gateway_config(
        ca_dir, {"web": [{"address": web_upstream.host, "port": web_upstream.port, "spiffe_id": WEB_ID}]},
        client_auth="required", telemetry={"access_log": {"enabled": False}})
    async with running(config) as gw, aiohttp.ClientSession() as client:
        host, port = gw.addresses["public"]
        for _ in range(2):  # no client certificate on a listener that requires one
            with pytest.raises((ssl_module.SSLError, ConnectionResetError)):
                reader, writer = await asyncio.open_connection(host, port, ssl=client_ssl(ca.bundle_pem),
                                                               server_hostname="localhost")
                writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
                await writer.drain()
                if not await asyncio.wait_for(reader.read(100), 10):
                    raise ConnectionResetError("closed without a response")
        key = ("mesh_gateway_tls_handshake_errors_total", (("listener", "public"),))
        samples = await scrape_until(client, admin_url(gw, "/metrics"), lambda m: m.get(key) == 2)
    assert samples[key] == 2


async def test_open_upstream_connections_are_a_gauge_per_service(ca, ca_dir, web_upstream, client_creds):
    config = gateway_config(
        ca_dir, {"web": [{"address": web_upstream.host, "port": web_upstream.port, "spiffe_id": WEB_ID}]},
        telemetry={"access_log": {"enabled": False}})
    key = ("mesh_gateway_upstream_active_connections", (("service", "web"),))
    async with running(config) as gw, aiohttp.ClientSession() as client:
        ssl = client_ssl(ca.bundle_pem, client_creds)
        for _ in range(3):  # sequential requests reuse one pooled keep-alive connection
            assert (await get(client, ssl, url(gw, "/")))[0] == 200
        samples = await scrape(client, admin_url(gw, "/metrics"))
        assert samples[key] == 1
        await web_upstream.close()  # the upstream goes away: its connection closes
        samples = await scrape_until(client, admin_url(gw, "/metrics"), lambda m: m.get(key) == 0)
    assert samples[key] == 0
