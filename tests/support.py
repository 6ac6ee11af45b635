"""Test helpers shared by the suite: a CA, credentials on disk, configs, a running gateway, TLS clients."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from mesh_gateway import config as cfg
from mesh_gateway.app import Gateway
from mesh_gateway.identity.ca import CertificateAuthority
from mesh_gateway.identity.tls import load_chain
from mesh_gateway.model import Credentials, SpiffeId

TRUST_DOMAIN = "mesh.local"
GATEWAY_ID = "spiffe://mesh.local/ns/default/sa/gateway"
WEB_ID = "spiffe://mesh.local/ns/default/sa/web"
CLIENT_ID = "spiffe://mesh.local/ns/default/sa/client"


def issue(ca: CertificateAuthority, spiffe_id: str, ttl_s: float = 3600,
          dns: tuple[str, ...] = ("localhost", "127.0.0.1")) -> Credentials:
    return ca.issue_credentials(SpiffeId.parse(spiffe_id), ttl_s, dns)


def write_credentials(creds: Credentials, directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    cert.write_bytes(creds.cert_chain_pem)
    key.write_bytes(creds.key_pem)
    key.chmod(0o600)
    return cert, key


def client_ssl(bundle_pem: bytes, creds: Credentials | None = None) -> ssl.SSLContext:
    """What a mesh client uses to call the gateway: verifies the gateway against the bundle, presents `creds`."""
    context = ssl.create_default_context(cadata=bundle_pem.decode())
    if creds is not None:
        load_chain(context, creds.cert_chain_pem, creds.key_pem)
    return context


def gateway_config(ca_dir: Path, upstreams: dict[str, list[dict[str, Any]]], *,
                   routes: list[dict[str, Any]] | None = None, client_auth: str = "optional",
                   tls: bool = True, **extra: Any) -> cfg.GatewayConfig:
    listener: dict[str, Any] = {"name": "public", "address": "127.0.0.1:0"}
    if "MESH_TEST_HTTP1_SERVER" in os.environ:  # the Makefile reruns the edge tests on the aiohttp server
        listener["server"] = os.environ["MESH_TEST_HTTP1_SERVER"]
    if tls:
        listener["tls"] = {"client_auth": client_auth}
    data: dict[str, Any] = {
        "trust_domain": TRUST_DOMAIN,
        "listeners": [listener],
        "identity": {"ca_dir": str(ca_dir), "spiffe_id": GATEWAY_ID, "dns": ["localhost", "127.0.0.1"]},
        "catalog": {"static": upstreams},
        "routes": routes if routes is not None else [
            {"name": name, "match": {"path_prefix": "/"}, "service": name} for name in list(upstreams)[:1]],
        "admin": {"address": "127.0.0.1:0"},
        "drain_timeout_s": 5,
    }
    data.update(extra)
    return cfg.parse(data)


@contextlib.asynccontextmanager
async def running(config: cfg.GatewayConfig, **kwargs: Any) -> AsyncIterator[Gateway]:
    gateway = Gateway(config, **kwargs)
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop()


def url(gateway: Gateway, path: str = "/", listener: str = "public", scheme: str = "https") -> str:
    host, port = gateway.addresses[listener]
    return f"{scheme}://{host}:{port}{path}"


def admin_url(gateway: Gateway, path: str) -> str:
    host, port = gateway.addresses["admin"]
    return f"http://{host}:{port}{path}"


async def reap(process: asyncio.subprocess.Process) -> None:
    """Kill `process` if it still runs, wait for it, and read its pipes to EOF so their transports close before
    the test's event loop does (uvloop refuses to close a loop with a live pipe)."""
    if process.returncode is None:
        process.kill()
    await process.wait()
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stream.read(), 10)
