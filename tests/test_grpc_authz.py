"""gRPC through the real Rego engine: the OPA-Envoy input shape for gRPC, a deny is PERMISSION_DENIED."""

from __future__ import annotations

from pathlib import Path

import grpc
import grpc.aio
import pytest

from tests.grpc_support import grpc_config, stub
from tests.support import running

POLICY = '''package envoy.authz

import rego.v1

default allow := false

# Streams for the client workload, as OPA-Envoy would see a gRPC call: POST, parsed_path = [service, method].
allow if {
    input.attributes.request.http.method == "POST"
    input.parsed_path == ["meshtest.Echo", "ServerStream"]
    input.attributes.source.principal == "spiffe://mesh.local/ns/default/sa/client"
}

# Unary only with the admin role in the call's metadata.
allow if {
    input.attributes.request.http.path == "/meshtest.Echo/Unary"
    input.attributes.request.http.headers["x-role"] == "admin"
}
'''


async def test_rego_policy_decides_grpc_calls_by_service_method_identity_and_metadata(
        ca, ca_dir, echo, protos, client_creds, tmp_path: Path):
    pb, pb_grpc = protos
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "grpc.rego").write_text(POLICY)
    config = grpc_config(ca_dir, echo.port, authz={"policies": str(policies), "decision_log": {"sink": "off"}})
    async with running(config) as gw:
        channel, client = stub(gw, ca, client_creds, pb_grpc)
        async with channel:
            streamed = [m.text async for m in client.ServerStream(pb.Msg(text="s", count=3), timeout=10)]
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await client.Unary(pb.Msg(text="no role"), timeout=10)
            admin = await client.Unary(pb.Msg(text="admin"), timeout=10, metadata=(("x-role", "admin"),))
            with pytest.raises(grpc.aio.AioRpcError) as bidi_denied:
                await client.Bidi(iter([pb.Msg(text="x")]), timeout=10).read()
    assert streamed == ["s-0", "s-1", "s-2"]
    assert (denied.value.code(), denied.value.details()) == (grpc.StatusCode.PERMISSION_DENIED, "forbidden")
    assert admin.text == "ADMIN"
    assert bidi_denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert echo.calls == ["ServerStream", "Unary"]
