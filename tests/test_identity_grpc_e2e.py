"""The real Rotator under the gRPC edge and forwarder: rotated SVIDs are picked up without a restart."""

from __future__ import annotations

import asyncio
import time

from tests.grpc_support import grpc_config, stub
from tests.support import GATEWAY_ID, running


async def test_grpc_calls_keep_working_across_svid_rotations(ca, ca_dir, echo, protos, client_creds):
    pb, pb_grpc = protos
    async with running(grpc_config(ca_dir, echo.port), identity_ttl_s=3.0) as gw:
        long_lived, client = stub(gw, ca, client_creds, pb_grpc)
        failures: list[str] = []
        fresh_ok = 0
        deadline = time.monotonic() + 30
        async with long_lived:
            # until the gateway has rotated 3 times: calls on one channel opened before, and on new channels
            while gw.identity.status().rotations_total < 3:
                assert time.monotonic() < deadline, "the gateway did not rotate"
                reply = await client.Unary(pb.Msg(text="keep"), timeout=10)
                if reply.text != "KEEP" or reply.caller != GATEWAY_ID:
                    failures.append(f"long-lived: {reply}")
                channel, fresh = stub(gw, ca, client_creds, pb_grpc)
                async with channel:
                    reply = await fresh.Unary(pb.Msg(text="fresh"), timeout=10)
                    fresh_ok += reply.text == "FRESH"
                await asyncio.sleep(0.1)
            reply = await client.Unary(pb.Msg(text="after"), timeout=10)
        assert failures == [] and reply.text == "AFTER" and fresh_ok >= 3
        # upstream calls now go over a channel built from the current (rotated) credentials
        assert {version for _, version in gw.grpc_forwarder._channels} == {gw.credentials.version}
