"""gRPC test kit: the echo proto compiled at test time, a real mTLS grpc.aio upstream, clients, an authorizer."""

from __future__ import annotations

import asyncio
import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import grpc.aio
from grpc_tools import protoc

from mesh_gateway import config as cfg
from mesh_gateway.model import Credentials, Decision, RequestInfo, Route
from mesh_gateway.pipeline import Exchange
from tests.support import gateway_config

PROTOS = Path(__file__).parent / "protos"
ECHO_ID = "spiffe://mesh.local/ns/default/sa/echo"


def compile_echo(out: Path) -> tuple[ModuleType, ModuleType]:
    args = ["protoc", f"-I{PROTOS}", f"--python_out={out}", f"--grpc_python_out={out}", str(PROTOS / "echo.proto")]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on tests/protos/echo.proto")
    sys.path.insert(0, str(out))
    try:
        return importlib.import_module("echo_pb2"), importlib.import_module("echo_pb2_grpc")
    finally:
        sys.path.remove(str(out))


@dataclass
class EchoUpstream:
    """A real grpc.aio server requiring mTLS from our CA. Counts calls so tests can prove none arrived."""

    pb: ModuleType
    server: grpc.aio.Server
    port: int
    calls: list[str] = field(default_factory=list)

    async def close(self) -> None:
        await self.server.stop(None)


def _servicer(pb: ModuleType, pb_grpc: ModuleType, calls: list[str]) -> Any:
    def reply(request: Any, context: grpc.aio.ServicerContext, text: str) -> Any:
        caller = b"".join(context.auth_context().get("peer_spiffe_id", [])).decode()
        metadata = {m.key: m.value for m in context.invocation_metadata() if isinstance(m.value, str)}
        return pb.Msg(text=text, caller=caller, metadata=metadata)

    class Echo(pb_grpc.EchoServicer):  # type: ignore[misc,name-defined]
        async def Unary(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
            calls.append("Unary")
            await context.send_initial_metadata((("x-initial", "hello"),))
            if request.sleep_s:
                await asyncio.sleep(request.sleep_s)
            if request.text == "fail":
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the upstream says no",
                                    trailing_metadata=(("x-reason", "precondition"),))
            context.set_trailing_metadata((("x-trailer", "done"), ("x-trailer-bin", b"\x00\xff")))
            return reply(request, context, request.text.upper())

        async def ServerStream(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
            calls.append("ServerStream")
            for index in range(request.count):
                yield pb.Msg(text=f"{request.text}-{index}", count=index)

        async def ClientStream(self, requests: Any, context: grpc.aio.ServicerContext) -> Any:
            calls.append("ClientStream")
            texts = [message.text async for message in requests]
            return reply(None, context, "+".join(texts))

        async def Bidi(self, requests: Any, context: grpc.aio.ServicerContext) -> Any:
            calls.append("Bidi")
            async for message in requests:
                yield pb.Msg(text=f"echo:{message.text}", count=message.count)

    return Echo()


async def start_echo_upstream(pb: ModuleType, pb_grpc: ModuleType, creds: Credentials | None) -> EchoUpstream:
    """mTLS (client certificate required) with `creds`; plaintext when `creds` is None."""
    server = grpc.aio.server()
    calls: list[str] = []
    pb_grpc.add_EchoServicer_to_server(_servicer(pb, pb_grpc, calls), server)
    if creds is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        server_creds = grpc.ssl_server_credentials([(creds.key_pem, creds.cert_chain_pem)],
                                                   root_certificates=creds.bundle_pem, require_client_auth=True)
        port = server.add_secure_port("127.0.0.1:0", server_creds)
    await server.start()
    return EchoUpstream(pb, server, port, calls)


def client_channel(address: tuple[str, int], bundle_pem: bytes, creds: Credentials | None) -> grpc.aio.Channel:
    channel_creds = grpc.ssl_channel_credentials(bundle_pem, creds.key_pem if creds else None,
                                                 creds.cert_chain_pem if creds else None)
    return grpc.aio.secure_channel(f"{address[0]}:{address[1]}", channel_creds)


class DenyMethods:
    """A real pipeline.Authorizer: denies the listed /pkg.Service/Method paths and records what it was asked."""

    def __init__(self, *denied: str) -> None:
        self.denied = frozenset(denied)
        self.seen: list[RequestInfo] = []

    async def check(self, info: RequestInfo, route: Route, exchange: Exchange, body: object = None) -> Decision:
        self.seen.append(info)
        return Decision(allowed=info.path not in self.denied, engine="test", decision_id=f"d{len(self.seen)}")


def grpc_config(ca_dir: Path, port: int, *, spiffe_id: str = ECHO_ID, client_auth: str = "required",
                **extra: Any) -> cfg.GatewayConfig:
    return gateway_config(
        ca_dir, {"echo": [{"address": "127.0.0.1", "port": port, "spiffe_id": spiffe_id}]},
        listeners=[{"name": "grpc", "address": "127.0.0.1:0", "protocol": "grpc",
                    "tls": {"client_auth": client_auth}}],
        routes=[{"name": "echo", "match": {"grpc": {"service": "meshtest.Echo"}}, "service": "echo"}],
        **extra)


def stub(gw: Any, ca: Any, creds: Any, pb_grpc: ModuleType) -> tuple[grpc.aio.Channel, Any]:
    channel = client_channel(gw.addresses["grpc"], ca.bundle_pem, creds)
    return channel, pb_grpc.EchoStub(channel)
