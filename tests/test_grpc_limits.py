"""gRPC edge cases: an upstream that dies mid-stream, message size caps, channel sharing, listener without TLS."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
import pytest

from tests.grpc_support import grpc_config, start_echo_upstream, stub
from tests.support import issue, running


async def test_upstream_dying_mid_stream_fails_the_call_without_internal_details(ca, ca_dir, echo, protos,
                                                                                 client_creds):
    pb, pb_grpc = protos
    async with running(grpc_config(ca_dir, echo.port)) as gw:
        channel, client = stub(gw, ca, client_creds, pb_grpc)
        async with channel:
            call = client.ServerStream(pb.Msg(text="s", count=10_000_000), timeout=30)
            first = await call.read()
            await echo.server.stop(None)
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                while True:
                    if await call.read() is grpc.aio.EOF:
                        break
    assert first.count == 0
    assert failed.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    details = failed.value.details() or ""
    assert "unix:" not in details and "/tmp" not in details and "127.0.0.1" not in details


async def test_message_over_the_cap_is_refused_before_reaching_upstream(ca, ca_dir, echo, protos, client_creds):
    pb, pb_grpc = protos
    config = grpc_config(ca_dir, echo.port, protocols={"grpc": {"max_message_bytes": 4096}})
    async with running(config) as gw:
        channel, client = stub(gw, ca, client_creds, pb_grpc)
        async with channel:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await client.Unary(pb.Msg(text="x" * 10_000), timeout=10)
            small = await client.Unary(pb.Msg(text="small"), timeout=10)
    assert failed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert small.text == "SMALL"
    assert echo.calls == ["Unary"]


async def test_concurrent_calls_share_one_verified_channel(ca, ca_dir, echo, protos, client_creds):
    pb, pb_grpc = protos
    async with running(grpc_config(ca_dir, echo.port)) as gw:
        channel, client = stub(gw, ca, client_creds, pb_grpc)
        async with channel:
            replies = await asyncio.gather(*(client.Unary(pb.Msg(text=f"c{i}"), timeout=10) for i in range(50)))
        channels = len(gw.grpc_forwarder._channels)
    assert sorted(r.text for r in replies) == sorted(f"C{i}" for i in range(50))
    assert channels == 1


async def test_plaintext_grpc_listener_still_forwards_over_mtls(ca, ca_dir, echo, protos):
    pb, pb_grpc = protos
    config = grpc_config(ca_dir, echo.port)
    plain = config.listeners[0].model_copy(update={"tls": None})
    async with running(config.model_copy(update={"listeners": (plain,)})) as gw:
        host, port = gw.addresses["grpc"]
        async with grpc.aio.insecure_channel(f"{host}:{port}") as channel:
            reply = await pb_grpc.EchoStub(channel).Unary(pb.Msg(text="plain"), timeout=10)
    assert reply.text == "PLAIN"
    assert reply.metadata["x-forwarded-proto"] == "http"
    assert "x-forwarded-client-cert" not in reply.metadata


async def test_rotated_gateway_svid_moves_calls_to_a_new_verified_channel(ca, ca_dir, echo, protos, client_creds):
    pb, pb_grpc = protos
    async with running(grpc_config(ca_dir, echo.port)) as gw:
        channel, client = stub(gw, ca, client_creds, pb_grpc)
        async with channel:
            before = await client.Unary(pb.Msg(text="before"), timeout=10)
            gw.credentials.publish(issue(ca, "spiffe://mesh.local/ns/default/sa/gateway"))
            after = await client.Unary(pb.Msg(text="after"), timeout=10)
            versions = {version for _, version in gw.grpc_forwarder._channels}
    assert (before.text, after.text) == ("BEFORE", "AFTER")
    assert versions == {gw.credentials.version}
    assert echo.calls == ["Unary", "Unary"]


async def test_plain_upstream_endpoint_is_reached_without_tls(ca, ca_dir, protos, client_creds):
    pb, pb_grpc = protos
    plain = await start_echo_upstream(pb, pb_grpc, None)
    try:
        config = grpc_config(ca_dir, plain.port)
        catalog = config.catalog.model_copy(update={"static": {"echo": (
            config.catalog.static["echo"][0].model_copy(update={"tls": "plain", "spiffe_id": None}),)}})
        async with running(config.model_copy(update={"catalog": catalog})) as gw:
            channel, client = stub(gw, ca, client_creds, pb_grpc)
            async with channel:
                reply = await client.Unary(pb.Msg(text="clear"), timeout=10)
    finally:
        await plain.close()
    assert reply.text == "CLEAR"
    assert reply.caller == ""  # no TLS on that leg, so no gateway certificate either


async def test_method_names_that_are_not_service_and_method_are_unimplemented(ca, ca_dir, echo, protos,
                                                                             client_creds):
    async with running(grpc_config(ca_dir, echo.port)) as gw:
        channel, _ = stub(gw, ca, client_creds, protos[1])
        async with channel:
            odd = channel.unary_unary("/meshtest.Echo/../Unary")
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await odd(b"", timeout=10)
    assert failed.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert echo.calls == []
