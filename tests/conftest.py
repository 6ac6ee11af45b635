from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import pytest

from mesh_gateway.demo.upstream import RunningUpstream, start_upstream
from mesh_gateway.identity.ca import CertificateAuthority, init_ca
from tests.grpc_support import ECHO_ID, EchoUpstream, compile_echo, start_echo_upstream
from tests.support import CLIENT_ID, WEB_ID, issue

os.environ.setdefault("RUST_BACKTRACE", "0")

# The gateway runs on uvloop in production (app.new_event_loop), so the suite does too; MESH_TEST_LOOP=asyncio
# runs it on the standard loop, which the gateway falls back to where uvloop is not installed.
if os.environ.get("MESH_TEST_LOOP", "uvloop") == "uvloop":
    import asyncio

    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    return tmp_path / "ca"


@pytest.fixture
def ca(ca_dir: Path) -> CertificateAuthority:
    return init_ca(ca_dir, "mesh.local")


@pytest.fixture
async def web_upstream(ca: CertificateAuthority) -> AsyncIterator[RunningUpstream]:
    """An mTLS echo service with identity spiffe://mesh.local/ns/default/sa/web that requires client certs."""
    upstream = await start_upstream("web", issue(ca, WEB_ID))
    yield upstream
    await upstream.close()


@pytest.fixture
def client_creds(ca: CertificateAuthority):  # type: ignore[no-untyped-def]
    return issue(ca, CLIENT_ID)


@pytest.fixture(scope="session")
def protos(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, ModuleType]:
    """The test Echo service's protobuf and gRPC modules, compiled once per run with grpcio-tools."""
    return compile_echo(tmp_path_factory.mktemp("protos"))


@pytest.fixture
async def echo(ca: CertificateAuthority, protos: tuple[ModuleType, ModuleType]) -> AsyncIterator[EchoUpstream]:
    """A grpcio Echo service requiring mTLS, with identity ECHO_ID."""
    upstream = await start_echo_upstream(*protos, issue(ca, ECHO_ID))
    yield upstream
    await upstream.close()
