"""gRPC end to end: grpc client → gateway grpc listener (mTLS) → real grpc.aio upstream requiring mTLS."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest
from cryptography import x509

from mesh_gateway import config as cfg
from tests.grpc_support import (
    ECHO_ID,
    DenyMethods,
    grpc_config,
    start_echo_upstream,
    stub,
)
from tests.support import CLIENT_ID, GATEWAY_ID, client_ssl, gateway_config, issue, running, write_credentials


async def test_unary_reaches_upstream_as_gateway_with_metadata_both_ways(ca, ca_dir, echo, protos, client_creds):
    pb, pb_grpc = protos
    async with running(grpc_config(ca_dir, echo.port)) as gw:
        channel, client = stub(gw, ca, client_creds, pb_grpc)
        async with channel:
            call = client.Unary(pb.Msg(text="hi"), timeout=10, metadata=(
                ("x-custom", "kept"), ("x-spiffe-id", "spiffe://mesh.local/forged"),
                ("x-forwarded-client-cert", "By=forged"), ("x-blob-bin", b"\x01\x02")))
            reply = await call
            initial = await call.initial_metadata()
            trailing = await call.trailing_metadata()
    assert reply.text == "HI"
    assert reply.caller == GATEWAY_ID  # the upstream saw the gateway's SVID
    assert reply.metadata["x-custom"] == "kept"
    assert "x-spiffe-id" not in reply.metadata
    assert reply.metadata["x-forwarded-client-cert"] == f"By={GATEWAY_ID};URI={CLIENT_ID}"
    assert reply.metadata["x-forwarded-proto"] == "https"
    assert ("x-initial", "hello") in list(initial)
    assert ("x-trailer", "done") in list(trailing)
    assert ("x-trailer-bin", b"\x00\xff") in list(trailing)
    assert echo.calls == ["Unary"]


async def test_server_streaming_delivers_1000_messages_in_order(ca, ca_dir, echo, protos, client_creds):
    pb, pb_grpc = protos
    async with running(grpc_config(ca_dir, echo.port)) as gw:
        channel, client = stub(gw, ca, client_creds, pb_grpc)
        async with channel:
            received = [m.count async for m in client.ServerStream(pb.Msg(text="n", count=1000), timeout=30)]
    assert received == list(range(1000))


async def test_client_streaming_and_bidi_echo(ca, ca_dir, echo, protos, client_creds):
    pb, pb_grpc = protos
    async with running(grpc_config(ca_dir, echo.port)) as gw:
        channel, client = stub(gw, ca, client_creds, pb_grpc)
        async with channel:
            async def several() -> AsyncIterator[Any]:
                for text in ("a", "b", "c"):
                    yield pb.Msg(text=text)

            summed = await client.ClientStream(several(), timeout=10)
            bidi = client.Bidi(timeout=10)
            echoed = []
            for index in range(5):  # lock-step: each reply must arrive before the next message is sent
                await bidi.write(pb.Msg(text=f"m{index}", count=index))
                echoed.append((await bidi.read()).text)
            await bidi.done_writing()
            assert await bidi.read() is grpc.aio.EOF
            assert await bidi.code() == grpc.StatusCode.OK
    assert summed.text == "a+b+c"
    assert echoed == [f"echo:m{i}" for i in range(5)]


async def test_upstream_status_details_and_trailers_pass_through_unchanged(ca, ca_dir, echo, protos, client_creds):
    pb, pb_grpc = protos
    async with running(grpc_config(ca_dir, echo.port)) as gw:
        channel, client = stub(gw, ca, client_creds, pb_grpc)
        async with channel:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await client.Unary(pb.Msg(text="fail"), timeout=10)
    assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert failed.value.details() == "the upstream says no"
    assert ("x-reason", "precondition") in list(failed.value.trailing_metadata())


async def test_client_deadline_is_propagated_and_surfaces_as_deadline_exceeded(ca, ca_dir, echo, protos,
                                                                              client_creds):
    pb, pb_grpc = protos
    async with running(grpc_config(ca_dir, echo.port)) as gw:
        channel, client = stub(gw, ca, client_creds, pb_grpc)
        async with channel:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await client.Unary(pb.Msg(text="slow", sleep_s=30), timeout=0.5)
    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_route_timeout_caps_calls_without_a_deadline(ca, ca_dir, echo, protos, client_creds):
    pb, pb_grpc = protos
    config = grpc_config(ca_dir, echo.port)
    route = config.routes[0].model_copy(update={"timeout_s": 0.5})
    async with running(config.model_copy(update={"routes": (route,)})) as gw:
        channel, client = stub(gw, ca, client_creds, pb_grpc)
        async with channel:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await client.Unary(pb.Msg(text="slow", sleep_s=30))
    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_authz_deny_is_permission_denied_and_nothing_reaches_upstream(ca, ca_dir, echo, protos, client_creds):
    pb, pb_grpc = protos
    authorizer = DenyMethods("/meshtest.Echo/Unary")
    async with running(grpc_config(ca_dir, echo.port), authorizer=authorizer) as gw:
        channel, client = stub(gw, ca, client_creds, pb_grpc)
        async with channel:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await client.Unary(pb.Msg(text="hi"), timeout=10, metadata=(("x-who", "me"),))
            allowed = [m.text async for m in client.ServerStream(pb.Msg(text="ok", count=2), timeout=10)]
    assert failed.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert failed.value.details() == "forbidden"
    assert echo.calls == ["ServerStream"]
    assert allowed == ["ok-0", "ok-1"]
    info = authorizer.seen[0]
    assert (info.method, info.path, info.is_grpc) == ("POST", "/meshtest.Echo/Unary", True)
    assert str(info.peer_spiffe_id) == CLIENT_ID
    assert ("x-who", "me") in info.headers


async def test_upstream_with_wrong_spiffe_id_is_unavailable_and_gets_no_call(ca, ca_dir, protos, client_creds):
    pb, pb_grpc = protos
    impostor = await start_echo_upstream(pb, pb_grpc, issue(ca, "spiffe://mesh.local/ns/default/sa/impostor"))
    try:
        async with running(grpc_config(ca_dir, impostor.port, spiffe_id=ECHO_ID)) as gw:
            channel, client = stub(gw, ca, client_creds, pb_grpc)
            async with channel:
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await client.Unary(pb.Msg(text="secret"), timeout=10)
    finally:
        await impostor.close()
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert failed.value.details() == "upstream identity rejected"
    assert impostor.calls == []


async def test_upstream_down_is_unavailable_without_internal_details(ca, ca_dir, protos, client_creds):
    pb, pb_grpc = protos
    async with running(grpc_config(ca_dir, 1)) as gw:
        channel, client = stub(gw, ca, client_creds, pb_grpc)
        async with channel:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await client.Unary(pb.Msg(text="hi"), timeout=10)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert failed.value.details() == "upstream unavailable"


async def test_unrouted_method_is_not_found(ca, ca_dir, echo, protos, client_creds):
    pb, pb_grpc = protos
    config = grpc_config(ca_dir, echo.port)
    only_unary = config.routes[0].model_copy(
        update={"match": cfg.RouteMatch(grpc=cfg.GrpcMatch(service="meshtest.Echo", method="Unary"))})
    async with running(config.model_copy(update={"routes": (only_unary,)})) as gw:
        channel, client = stub(gw, ca, client_creds, pb_grpc)
        async with channel:
            assert (await client.Unary(pb.Msg(text="x"), timeout=10)).text == "X"
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await client.ClientStream(iter([pb.Msg(text="x")]), timeout=10)
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    assert failed.value.details() == "no route"


async def test_client_without_certificate_is_refused_on_required_listener(ca, ca_dir, echo, protos):
    pb, pb_grpc = protos
    async with running(grpc_config(ca_dir, echo.port)) as gw:
        channel, client = stub(gw, ca, None, pb_grpc)
        async with channel:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await client.Unary(pb.Msg(text="hi"), timeout=10)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert echo.calls == []


def _serving_serial(address: tuple[str, int], bundle_pem: bytes, creds: Any) -> int:
    """The serial of the certificate a fresh TLS handshake with the grpc listener is answered with."""
    context = client_ssl(bundle_pem, creds)
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(address, timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=address[0]) as tls:
        der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


async def test_rotated_gateway_certificate_is_served_to_new_connections(ca, ca_dir, echo, protos, client_creds):
    pb, pb_grpc = protos
    async with running(grpc_config(ca_dir, echo.port)) as gw:
        address = gw.addresses["grpc"]
        first = await asyncio.to_thread(_serving_serial, address, ca.bundle_pem, client_creds)
        assert first == gw.credentials.get().serial
        gw.credentials.publish(issue(ca, GATEWAY_ID))
        second = await asyncio.to_thread(_serving_serial, address, ca.bundle_pem, client_creds)
        channel, client = stub(gw, ca, client_creds, pb_grpc)
        async with channel:
            reply = await client.Unary(pb.Msg(text="after"), timeout=10)
    assert second == gw.credentials.get().serial != first
    assert reply.caller == GATEWAY_ID


def test_grpc_listener_rejects_optional_client_auth_naming_the_key(ca_dir):
    with pytest.raises(cfg.ConfigError) as failed:
        grpc_config(ca_dir, 1, client_auth="optional")
    assert "listeners[0].tls.client_auth" in str(failed.value)


def test_grpc_match_excludes_path_matches(ca_dir):
    with pytest.raises(cfg.ConfigError) as failed:
        gateway_config(ca_dir, {"echo": [{"address": "127.0.0.1", "port": 1, "spiffe_id": ECHO_ID}]},
                       routes=[{"name": "r", "service": "echo",
                                "match": {"grpc": {"service": "a.B"}, "path_prefix": "/x"}}])
    assert "routes[0].match" in str(failed.value)


async def test_listener_with_its_own_certificate_serves_it(ca, ca_dir, echo, protos, client_creds, tmp_path):
    pb, pb_grpc = protos
    edge_creds = issue(ca, "spiffe://mesh.local/ns/edge/sa/public")
    cert, key = write_credentials(edge_creds, tmp_path, "edge")
    config = grpc_config(ca_dir, echo.port)
    listener = config.listeners[0].model_copy(update={"tls": cfg.ListenerTls(cert=cert, key=key,
                                                                             client_auth="required")})
    async with running(config.model_copy(update={"listeners": (listener,)})) as gw:
        served = await asyncio.to_thread(_serving_serial, gw.addresses["grpc"], ca.bundle_pem, client_creds)
        channel, client = stub(gw, ca, client_creds, pb_grpc)
        async with channel:
            reply = await client.Unary(pb.Msg(text="own cert"), timeout=10)
    assert served == edge_creds.serial
    assert reply.caller == GATEWAY_ID  # the upstream leg still uses the gateway's SVID
