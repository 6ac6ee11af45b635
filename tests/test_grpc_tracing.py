"""Tracing for gRPC: trace context from client metadata, rpc.* attributes, traceparent injected upstream."""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import grpc.aio
import pytest

from tests.fakes.otlp import OtlpReceiver
from tests.grpc_support import ECHO_ID, DenyMethods, grpc_config, stub
from tests.support import CLIENT_ID, running

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()


def traced_config(ca_dir, port: int, endpoint: str):
    return grpc_config(ca_dir, port, telemetry={"tracing": {
        "exporter": "otlp_grpc", "endpoint": endpoint, "export_delay_s": 0.05, "export_timeout_s": 2,
        "shutdown_timeout_s": 2}})


async def test_grpc_call_is_one_trace_from_client_metadata_to_upstream(ca, ca_dir, echo, protos, client_creds,
                                                                      receiver):
    pb, pb_grpc = protos
    async with running(traced_config(ca_dir, echo.port, receiver.endpoint)) as gw:
        channel, client = stub(gw, ca, client_creds, pb_grpc)
        async with channel:
            reply = await client.Unary(pb.Msg(text="t"), timeout=10,
                                       metadata=(("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"),))
            with pytest.raises(grpc.aio.AioRpcError):
                await client.Unary(pb.Msg(text="fail"), timeout=10)
        spans = await receiver.wait_for(lambda s: len([x for x in s if x.kind == "server"]) == 2)
    ok_ingress = next(s for s in spans if s.kind == "server" and s.trace_id == CLIENT_TRACE)
    upstream = next(s for s in spans if s.kind == "client" and s.trace_id == CLIENT_TRACE)
    failed_ingress = next(s for s in spans if s.kind == "server" and s.trace_id != CLIENT_TRACE)
    assert ok_ingress.parent_span_id == CLIENT_SPAN
    assert ok_ingress.name == "POST echo"
    assert ok_ingress.attributes["rpc.system"] == "grpc"
    assert ok_ingress.attributes["rpc.service"] == "meshtest.Echo"
    assert ok_ingress.attributes["rpc.method"] == "Unary"
    assert ok_ingress.attributes["rpc.grpc.status_code"] == 0
    assert ok_ingress.attributes["mesh.peer.spiffe_id"] == CLIENT_ID
    assert (upstream.parent_span_id, upstream.attributes["mesh.upstream.spiffe_id"]) == (ok_ingress.span_id, ECHO_ID)
    # The upstream continues the trace under the gateway's upstream span.
    assert reply.metadata["traceparent"] == f"00-{CLIENT_TRACE}-{upstream.span_id}-01"
    assert failed_ingress.attributes["rpc.grpc.status_code"] == grpc.StatusCode.FAILED_PRECONDITION.value[0]


async def test_grpc_calls_are_access_logged_like_http(ca, ca_dir, echo, protos, client_creds, tmp_path):
    pb, pb_grpc = protos
    log_path = tmp_path / "access.log"
    config = grpc_config(ca_dir, echo.port, telemetry={"access_log": {"path": str(log_path),
                                                                      "flush_interval_s": 0.05}})
    async with running(config, authorizer=DenyMethods("/meshtest.Echo/ClientStream")) as gw:
        channel, client = stub(gw, ca, client_creds, pb_grpc)
        async with channel:
            await client.Unary(pb.Msg(text="logged"), timeout=10, metadata=(("x-request-id", "req-42"),))
            with pytest.raises(grpc.aio.AioRpcError):
                await client.ClientStream(iter([pb.Msg(text="x")]), timeout=10)
    allowed, denied = (json.loads(line) for line in log_path.read_text().splitlines())
    assert (allowed["path"], allowed["status"], allowed["route"], allowed["request_id"]) == (
        "/meshtest.Echo/Unary", 200, "echo", "req-42")
    assert (allowed["peer"], allowed["protocol"], allowed["method"]) == (CLIENT_ID, "HTTP/2", "POST")
    assert allowed["bytes_out"] > 0
    assert (denied["path"], denied["status"], denied["error"]) == ("/meshtest.Echo/ClientStream", 403, "Forbidden")
