"""The tracer on its own, exporting to a real in-process OTLP/gRPC receiver."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from mesh_gateway import config as cfg
from mesh_gateway.errors import AuthzUnavailable, Forbidden, NotFound
from mesh_gateway.model import PeerCert, RequestInfo, SpiffeId
from mesh_gateway.telemetry.semconv import split_authority
from mesh_gateway.telemetry.tracing import OtelTracer
from tests.fakes.otlp import OtlpHttpReceiver, OtlpReceiver
from tests.support import issue

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()


def tracing(endpoint: str, **overrides: object) -> cfg.Tracing:
    settings: dict[str, object] = {"exporter": "otlp_grpc", "endpoint": endpoint, "export_delay_s": 0.05,
                                   "export_timeout_s": 2, "shutdown_timeout_s": 2}
    settings.update(overrides)
    return cfg.Tracing.model_validate(settings)


def make_tracer(config: cfg.Tracing) -> OtelTracer:
    return OtelTracer(config, service_name="edge-gw", service_version="9.9.9", instance_id="gw-1")


def request(headers: tuple[tuple[str, str], ...] = (), *, method: str = "GET", path: str = "/orders/7",
            grpc: bool = False) -> RequestInfo:
    return RequestInfo(method=method, path=path, query="token=secret", host="shop.example:8443", scheme="https",
                       headers=(("user-agent", "curl/8"), *headers), client_address="127.0.0.1",
                       client_port=40000, request_id="r1", protocol="HTTP/1.1",
                       peer=PeerCert(SpiffeId.parse("spiffe://mesh.local/ns/default/sa/client")), is_grpc=grpc)


def upstream_headers(tracer: OtelTracer, info: RequestInfo) -> tuple[str, str, dict[str, str]]:
    """Runs ingress → upstream like the pipeline does; returns the two span ids and what the upstream receives."""
    ingress = tracer.ingress(info)
    upstream = tracer.child(ingress, "upstream", client=True)
    headers = [("x-request-id", "r1"), *((n, v) for n, v in info.headers if n != "user-agent")]
    upstream.inject(headers)
    upstream.end()
    ingress.end()
    names = [n for n, _ in headers]
    assert len(names) == len(set(names)), f"duplicate trace headers: {headers}"
    return ingress.span_id, upstream.span_id, dict(headers)


async def test_spans_link_to_the_client_span_and_carry_resource_and_semconv(receiver):
    tracer = make_tracer(tracing(receiver.endpoint, headers={"Authorization": "Bearer t0k"}))
    info = request((("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"),))
    ingress = tracer.ingress(info)
    ingress.rename("GET orders")
    authz = tracer.child(ingress, "authz")
    authz.set("mesh.authz.allowed", True)
    authz.end()
    ingress.set("http.response.status_code", 200)
    ingress.end()
    spans = await receiver.wait_for(lambda s: len(s) == 2)
    tracer.shutdown()
    server = next(s for s in spans if s.kind == "server")
    child = next(s for s in spans if s.name == "authz")
    assert server.name == "GET orders"
    assert (server.trace_id, server.parent_span_id) == (CLIENT_TRACE, CLIENT_SPAN)
    assert (child.trace_id, child.parent_span_id) == (CLIENT_TRACE, server.span_id)
    assert ingress.trace_id == CLIENT_TRACE and ingress.span_id == server.span_id
    assert server.resource["service.name"] == "edge-gw"
    assert server.resource["service.version"] == "9.9.9"
    assert server.resource["service.instance.id"] == "gw-1"
    assert server.attributes == {
        "http.request.method": "GET", "url.path": "/orders/7", "url.scheme": "https",
        "server.address": "shop.example", "server.port": 8443, "client.address": "127.0.0.1",
        "client.port": 40000, "network.protocol.version": "1.1", "user_agent.original": "curl/8",
        "mesh.peer.spiffe_id": "spiffe://mesh.local/ns/default/sa/client", "http.response.status_code": 200}
    assert "token=secret" not in repr(server.attributes)
    assert child.attributes == {"mesh.authz.allowed": True}
    assert receiver.metadata[0]["authorization"] == "Bearer t0k"


async def test_otlp_http_exporter_delivers_spans():
    receiver = await OtlpHttpReceiver().start_http()
    try:
        tracer = make_tracer(tracing(receiver.endpoint, exporter="otlp_http", headers={"x-api-key": "k1"}))
        tracer.ingress(request()).end()
        [server] = await receiver.wait_for(lambda s: len(s) == 1)
        await asyncio.to_thread(tracer.shutdown)
    finally:
        await receiver.stop_http()
    assert server.kind == "server" and server.resource["service.name"] == "edge-gw"
    assert tracer.stats().exported == 1
    assert receiver.metadata[0]["x-api-key"] == "k1"


async def test_tls_collector_verified_against_ca_file(ca, tmp_path):
    creds = issue(ca, "spiffe://mesh.local/ns/observability/sa/collector")
    receiver = OtlpReceiver().start(tls=(creds.cert_chain_pem, creds.key_pem))
    (tmp_path / "roots.pem").write_bytes(ca.bundle_pem)
    try:
        endpoint = f"https://localhost:{receiver.port}"
        tracer = make_tracer(tracing(endpoint, ca_file=tmp_path / "roots.pem"))
        tracer.ingress(request()).end()
        await receiver.wait_for(lambda s: len(s) == 1)
        tracer.shutdown()
        # Without our roots the collector's certificate is not trusted: nothing is delivered.
        untrusting = make_tracer(tracing(endpoint, export_timeout_s=0.5))
        untrusting.ingress(request()).end()
        untrusting.shutdown()
    finally:
        receiver.stop()
    assert len(receiver.snapshot()) == 1
    assert untrusting.stats().dropped_export_failed == 1


async def test_grpc_requests_carry_rpc_attributes(receiver):
    tracer = make_tracer(tracing(receiver.endpoint))
    span = tracer.ingress(request(method="POST", path="/shop.v1.Orders/Get", grpc=True))
    span.set("rpc.grpc.status_code", 0)
    span.end()
    [server] = await receiver.wait_for(lambda s: len(s) == 1)
    tracer.shutdown()
    assert server.attributes["rpc.system"] == "grpc"
    assert server.attributes["rpc.service"] == "shop.v1.Orders"
    assert server.attributes["rpc.method"] == "Get"
    assert server.attributes["rpc.grpc.status_code"] == 0


@pytest.mark.parametrize("headers", [
    (("b3", f"{CLIENT_TRACE}-{CLIENT_SPAN}-1"),),
    (("x-b3-traceid", CLIENT_TRACE), ("x-b3-spanid", CLIENT_SPAN), ("x-b3-sampled", "1")),
], ids=["b3-single", "b3-multi"])
async def test_b3_input_is_honoured_and_w3c_goes_upstream(receiver, headers):
    tracer = make_tracer(tracing(receiver.endpoint))
    ingress_id, upstream_id, sent = upstream_headers(tracer, request(headers))
    spans = await receiver.wait_for(lambda s: len(s) == 2)
    tracer.shutdown()
    server = next(s for s in spans if s.kind == "server")
    client = next(s for s in spans if s.kind == "client")
    assert (server.trace_id, server.parent_span_id, server.span_id) == (CLIENT_TRACE, CLIENT_SPAN, ingress_id)
    assert (client.parent_span_id, client.span_id) == (ingress_id, upstream_id)
    assert sent["traceparent"] == f"00-{CLIENT_TRACE}-{upstream_id}-01"
    assert not {"b3", "x-b3-traceid", "x-b3-spanid", "x-b3-sampled"} & set(sent), "stale B3 must not leak upstream"


async def test_b3_injection_when_configured(receiver):
    tracer = make_tracer(tracing(receiver.endpoint, propagators=["w3c", "b3", "b3multi"]))
    _, upstream_id, sent = upstream_headers(tracer, request((("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"),)))
    tracer.shutdown()
    assert sent["traceparent"] == f"00-{CLIENT_TRACE}-{upstream_id}-01"
    assert sent["b3"] == f"{CLIENT_TRACE}-{upstream_id}-1"
    assert (sent["x-b3-traceid"], sent["x-b3-spanid"], sent["x-b3-sampled"]) == (CLIENT_TRACE, upstream_id, "1")


async def test_tracestate_and_baggage_pass_through(receiver):
    tracer = make_tracer(tracing(receiver.endpoint, sampling_ratio=0))
    _, upstream_id, sent = upstream_headers(tracer, request((
        ("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00"), ("tracestate", "vendor=abc"),
        ("baggage", "tenant=acme"))))
    tracer.shutdown()
    assert sent["traceparent"] == f"00-{CLIENT_TRACE}-{upstream_id}-00"
    assert sent["tracestate"] == "vendor=abc"
    assert sent["baggage"] == "tenant=acme"


async def test_ratio_zero_exports_nothing_but_still_propagates(receiver):
    tracer = make_tracer(tracing(receiver.endpoint, sampling_ratio=0))
    ingress_id, upstream_id, sent = upstream_headers(tracer, request())
    trace_id = tracer.ingress(request()).trace_id
    assert tracer.force_flush()
    tracer.shutdown()
    assert receiver.snapshot() == []
    assert tracer.stats().exported == 0
    version, sent_trace, parent, flags = sent["traceparent"].split("-")
    assert (version, parent, flags) == ("00", upstream_id, "00")
    assert len(sent_trace) == 32 and int(sent_trace, 16) and len(trace_id) == 32
    assert ingress_id != upstream_id


async def test_sampled_client_wins_over_ratio_zero_and_unsampled_client_wins_over_ratio_one(receiver):
    tracer = make_tracer(tracing(receiver.endpoint, sampling_ratio=0))
    tracer.ingress(request((("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"),))).end()
    await receiver.wait_for(lambda s: len(s) == 1)
    tracer.shutdown()
    tracer = make_tracer(tracing(receiver.endpoint, sampling_ratio=1))
    _, _, sent = upstream_headers(tracer, request((("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00"),)))
    assert tracer.force_flush()
    tracer.shutdown()
    assert len(receiver.snapshot()) == 1
    assert sent["traceparent"].endswith("-00")


async def test_exporter_none_records_nothing_and_propagates():
    tracer = make_tracer(cfg.Tracing(exporter="none"))
    assert not tracer.recording
    _, upstream_id, sent = upstream_headers(tracer, request((("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"),)))
    tracer.shutdown()
    assert sent["traceparent"] == f"00-{CLIENT_TRACE}-{upstream_id}-01"


async def test_receiver_down_drops_and_counts_without_blocking(receiver):
    receiver.stop()  # its port is now closed: every export is refused
    tracer = make_tracer(tracing(receiver.endpoint, export_timeout_s=0.5, shutdown_timeout_s=1))
    for _ in range(5):
        upstream_headers(tracer, request())
    tracer.force_flush()
    tracer.shutdown()
    stats = tracer.stats()
    assert stats.exported == 0
    assert stats.dropped_export_failed == 10


async def test_shutdown_is_bounded_when_the_collector_hangs():
    receiver = OtlpReceiver(hold=threading.Event()).start()
    try:
        tracer = make_tracer(tracing(receiver.endpoint, export_timeout_s=60, shutdown_timeout_s=0.3,
                                     max_export_batch_size=1))
        tracer.ingress(request()).end()
        deadline = time.monotonic() + 10
        while receiver.started == 0 and time.monotonic() < deadline:  # the first export is now hanging
            await asyncio.sleep(0.01)
        for _ in range(3):
            tracer.ingress(request()).end()
        await asyncio.to_thread(tracer.shutdown)  # returns although the collector never answers
        stats = tracer.stats()
    finally:
        assert receiver.hold is not None
        receiver.hold.set()
        receiver.stop()
    assert stats.exported == 0
    assert stats.dropped_export_failed >= 3


async def test_full_queue_drops_and_counts(receiver):
    receiver.stop()
    tracer = make_tracer(tracing(receiver.endpoint, max_queue_size=4, max_export_batch_size=4, export_delay_s=60,
                                 export_timeout_s=0.5, shutdown_timeout_s=1))
    for _ in range(10):
        tracer.ingress(request()).end()
    tracer.shutdown()
    stats = tracer.stats()
    assert stats.dropped_queue_full + stats.dropped_export_failed == 10
    assert stats.dropped_queue_full >= 6


async def test_errors_follow_semantic_conventions(receiver):
    tracer = make_tracer(tracing(receiver.endpoint))
    for error in (NotFound("no route"), Forbidden("denied"), AuthzUnavailable("opa down")):
        span = tracer.ingress(request())
        child = tracer.child(span, "authz")
        child.fail(error)
        child.end()
        span.fail(error)
        span.set("http.response.status_code", error.status)  # as the edge does after the pipeline failed it
        span.end()
    upstream = tracer.child(tracer.ingress(request()), "upstream", client=True)
    upstream.set("http.response.status_code", 404)
    upstream.end()
    spans = await receiver.wait_for(lambda s: len(s) == 7)
    tracer.shutdown()
    servers = {s.attributes["error.type"]: s.status for s in spans if s.kind == "server"}
    children = {s.attributes["error.type"]: (s.status, s.status_message) for s in spans if s.name == "authz"}
    assert servers == {"NotFound": "unset", "Forbidden": "unset", "AuthzUnavailable": "error"}
    assert children["AuthzUnavailable"] == ("error", "opa down")
    assert children["Forbidden"][0] == "error"
    [client] = [s for s in spans if s.kind == "client"]
    assert (client.status, client.attributes["error.type"]) == ("error", "404")


@pytest.mark.parametrize(("given", "expected"), [
    ("example.com", ("example.com", None)), ("example.com:8443", ("example.com", 8443)),
    ("[::1]:9000", ("::1", 9000)), ("[::1]", ("::1", None)), ("::1", ("::1", None)), ("", ("", None)),
])
def test_split_authority(given, expected):
    assert split_authority(given) == expected


@pytest.mark.parametrize(("settings", "message"), [
    ({"sampling_ratio": 1.5}, "telemetry.tracing.sampling_ratio"),
    ({"propagators": ["zipkin"]}, "telemetry.tracing.propagators"),
    ({"propagators": []}, "telemetry.tracing.propagators"),
    ({"exporter": "jaeger"}, "telemetry.tracing.exporter"),
    ({"endpoint": "127.0.0.1:4317"}, "telemetry.tracing.endpoint"),
    ({"max_queue_size": 10, "max_export_batch_size": 20}, "telemetry.tracing.max_export_batch_size"),
    ({"colour": "red"}, "telemetry.tracing.colour: unknown key"),
    ({"exporter": "otlp_grpc", "ca_file": "ca.pem"}, "telemetry.tracing.ca_file: only used with an https://"),
])
def test_bad_tracing_config_names_the_key(settings, message):
    data = {"trust_domain": "mesh.local", "listeners": [{"name": "p", "address": "127.0.0.1:0"}],
            "identity": {"spiffe_id": "spiffe://mesh.local/gw"}, "telemetry": {"tracing": settings}}
    with pytest.raises(cfg.ConfigError) as raised:
        cfg.parse(data)
    assert message in str(raised.value)


def test_defaults_and_secret_headers_stay_hidden():
    config = cfg.Tracing(exporter="otlp_grpc", headers={"x-api-key": "s3cret"})
    assert config.effective_endpoint == "http://127.0.0.1:4317"
    assert cfg.Tracing(exporter="otlp_http").effective_endpoint == "http://127.0.0.1:4318/v1/traces"
    assert config.sampling_ratio == 1.0
    assert "s3cret" not in repr(config)
