"""The tracer's own fast paths give the results the SDK's general path gave.

Recorded spans are built without the SDK's Tracer: what reaches the exporter is what the SDK would have sent. A lone
unsampled traceparent is followed without the propagators: same trace id upstream, invalid ids still refused."""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, StatusCode

from mesh_gateway import config as cfg
from mesh_gateway.errors import AuthzUnavailable, NotFound
from mesh_gateway.model import RequestInfo
from mesh_gateway.telemetry.tracing import OtelTracer

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


class Sink(SpanExporter):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def traced(headers: tuple[tuple[str, str], ...] = ()) -> tuple[OtelTracer, Sink, RequestInfo]:
    sink = Sink()
    tracer = OtelTracer(cfg.Tracing(sampling_ratio=1.0, export_delay_s=0.05), service_name="gw",
                        service_version="1.2.3", instance_id="i-1", exporter=sink)
    info = RequestInfo(method="GET", path="/a", query="", host="h", scheme="https", headers=headers,
                       client_address="127.0.0.1", client_port=1, request_id="r")
    return tracer, sink, info


def test_spans_carry_ids_parents_kinds_status_resource_and_scope():
    tracer, sink, info = traced((("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"), ("tracestate", "v=1")))
    ingress = tracer.ingress(info)
    authz = tracer.child(ingress, "authz")
    authz.fail(AuthzUnavailable("engine gone"))
    authz.end()
    upstream = tracer.child(ingress, "upstream", client=True)
    upstream.set("http.response.status_code", 404)
    upstream.end()
    ingress.fail(NotFound("no route"))
    ingress.set("http.response.status_code", 404)
    ingress.end()
    assert tracer.force_flush()
    tracer.shutdown()
    by_name = {s.name: s for s in sink.spans}
    server, child, client = by_name["GET"], by_name["authz"], by_name["upstream"]
    assert (server.kind, child.kind, client.kind) == (SpanKind.SERVER, SpanKind.INTERNAL, SpanKind.CLIENT)
    assert server.parent is not None and server.parent.is_remote
    assert format(server.parent.span_id, "016x") == CLIENT_SPAN
    assert {format(s.context.trace_id, "032x") for s in sink.spans} == {CLIENT_TRACE}
    assert child.parent == server.context and client.parent == server.context
    assert all(s.context.trace_state.get("v") == "1" and s.context.trace_flags.sampled for s in sink.spans)
    # A 4xx is the client's fault on a SERVER span; the CLIENT span and the failed authz span are errors.
    assert server.status.status_code is StatusCode.UNSET and server.attributes["error.type"] == "NotFound"
    assert (child.status.status_code, child.status.description) == (StatusCode.ERROR, "engine gone")
    assert client.status.status_code is StatusCode.ERROR and client.attributes["error.type"] == "404"
    assert dict(server.resource.attributes) == {"service.name": "gw", "service.version": "1.2.3",
                                               "service.instance.id": "i-1"}
    assert server.instrumentation_scope is not None
    assert (server.instrumentation_scope.name, server.instrumentation_scope.version) == ("mesh_gateway", "1.2.3")
    assert server.start_time is not None and server.end_time is not None and server.start_time <= server.end_time


def test_an_ended_span_is_exported_once_and_no_longer_changes():
    tracer, sink, info = traced()
    span = tracer.ingress(info)
    span.end()
    span.set("late", 1)
    span.fail(NotFound("late"))
    span.end()
    assert tracer.force_flush()
    tracer.shutdown()
    [exported] = sink.spans
    assert "late" not in exported.attributes and "error.type" not in exported.attributes
    assert tracer.stats().exported == 1


def test_a_new_sampled_trace_is_flagged_random_and_an_inbound_one_keeps_its_flags():
    tracer, _, info = traced()
    headers: list[tuple[str, str]] = []
    tracer.child(tracer.ingress(info), "upstream", client=True).inject(headers)
    assert dict(headers)["traceparent"].endswith("-03")  # sampled + random trace id, as the SDK sets it
    tracer, _, info = traced((("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"),))
    headers = []
    tracer.child(tracer.ingress(info), "upstream", client=True).inject(headers)
    assert dict(headers)["traceparent"].startswith(f"00-{CLIENT_TRACE}-") and headers[0][1].endswith("-01")
    tracer.shutdown()


def test_a_lone_unsampled_traceparent_is_followed_and_an_all_zero_one_is_not():
    sink = Sink()
    tracer = OtelTracer(cfg.Tracing(sampling_ratio=1.0), service_name="gw", service_version="1", instance_id="i",
                        exporter=sink)
    for traceparent, follows in [(f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00", True),
                                 (f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-02", True),
                                 (f"00-{'0' * 32}-{CLIENT_SPAN}-00", False),
                                 (f"00-{CLIENT_TRACE}-{'0' * 16}-00", False)]:
        info = RequestInfo(method="GET", path="/a", query="", host="h", scheme="https", client_address="",
                           client_port=0, headers=(("traceparent", traceparent),), request_id="r")
        ingress = tracer.ingress(info)
        headers: list[tuple[str, str]] = [("traceparent", traceparent)]
        upstream = tracer.child(ingress, "upstream", client=True)
        upstream.inject(headers)
        [(header, sent)] = headers
        assert header == "traceparent"
        _, trace_id, parent_id, flags = sent.split("-")
        if follows:  # same trace, our span as the parent, still unsampled: nothing recorded
            assert (ingress.trace_id, trace_id, flags) == (CLIENT_TRACE, CLIENT_TRACE, "00")
            assert parent_id == upstream.span_id
            assert ingress.span_id != upstream.span_id
        else:  # an invalid parent starts a new trace, sampled at ratio 1
            assert trace_id not in (CLIENT_TRACE, "0" * 32) and flags == "03"
        upstream.end()
        ingress.end()
    assert tracer.force_flush()
    tracer.shutdown()
    assert len(sink.spans) == 4  # the two new traces' ingress and upstream spans only
