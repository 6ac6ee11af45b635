"""Sidecar identity from the CA API (`identity.issuer: remote`): a one-time join token bootstraps the SVID; a used or
expired token stops the sidecar with a clear message and exit code 1. The sidecar runs as a real process and never
sees the CA directory — only the trust bundle."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from mesh_gateway.identity.issuer_api import IssuerServer, IssuerSettings
from mesh_gateway.identity.join_tokens import JoinTokenStore
from mesh_gateway.identity.local_issuer import LocalIssuer
from mesh_gateway.model import SpiffeId
from tests.processes import spawn

ORDERS_ID = "spiffe://mesh.local/ns/default/sa/orders"
REFUSED = "join token is unknown, expired or already used"


@pytest.fixture
async def issuer(ca, ca_dir) -> AsyncIterator[IssuerServer]:  # type: ignore[no-untyped-def]
    server = IssuerServer(LocalIssuer(ca_dir), IssuerSettings(address="127.0.0.1:0",
                                                              bootstrap_address="127.0.0.1:0"))
    await server.start()
    yield server
    await server.stop()


def write_config(directory: Path, issuer: IssuerServer, token_file: Path | None = None) -> Path:
    """A sidecar of orders whose only secret material is a join token; the bundle is a copy, not the CA dir."""
    directory.mkdir(exist_ok=True)
    remote: dict[str, Any] = {"address": f"127.0.0.1:{issuer.port}",
                              "bootstrap_address": f"127.0.0.1:{issuer.bootstrap_port}",
                              "bundle": "bundle.pem", "server_name": "localhost"}
    if token_file is not None:
        remote["join_token_file"] = str(token_file)
    path = directory / "sidecar.yaml"
    path.write_text(yaml.safe_dump({
        "trust_domain": "mesh.local",
        "service": {"name": "orders", "port": 1},
        # No DNS SANs: the CA API signs only what its policy allows, and mesh peers check the SPIFFE ID anyway.
        "identity": {"spiffe_id": ORDERS_ID, "issuer": "remote", "ca_dir": "no-ca-here", "dns": [],
                     "remote": remote},
        "inbound": {"address": "127.0.0.1:0"},
        "outbound": {"enabled": False},
        "admin": {"address": "127.0.0.1:0"},
        "drain_timeout_s": 1,
    }))
    return path


async def test_join_token_bootstraps_once_and_a_used_token_is_refused(ca_dir, issuer, tmp_path):
    token = JoinTokenStore(ca_dir).create(SpiffeId.parse(ORDERS_ID), 900)
    workdir = tmp_path / "sidecar"
    config = write_config(workdir, issuer)
    shutil.copy(ca_dir / "bundle.pem", workdir / "bundle.pem")

    first = await spawn("sidecar", "sidecar", "-c", str(config), env={"MESH_JOIN_TOKEN": token})
    try:
        found = await first.wait_for(r"serving: inbound=\S+, admin=127\.0\.0\.1:(\d+)")
        async with aiohttp.ClientSession() as client, \
                client.get(f"http://127.0.0.1:{found.group(1)}/certs") as resp:
            certs = await resp.json()
    finally:
        code = await first.stop()
    assert code == 0
    assert certs["svid"]["spiffe_id"] == ORDERS_ID
    assert certs["issuer"].startswith("remote")
    assert not any(token in line for line in first.lines), "the token must never be logged"

    again = await spawn("sidecar-again", "sidecar", "-c", str(config), env={"MESH_JOIN_TOKEN": token})
    assert await again.exited() == 1
    assert any("cannot start" in line and REFUSED in line for line in again.lines), again.lines


async def test_expired_join_token_file_is_refused_with_a_clear_message(ca_dir, issuer, tmp_path):
    an_hour_ago = time.time() - 3600
    token = JoinTokenStore(ca_dir, clock=lambda: an_hour_ago).create(SpiffeId.parse(ORDERS_ID), 900)
    workdir = tmp_path / "sidecar"
    workdir.mkdir()
    token_file = workdir / "join-token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    config = write_config(workdir, issuer, token_file=token_file)
    shutil.copy(ca_dir / "bundle.pem", workdir / "bundle.pem")

    proc = await spawn("sidecar", "sidecar", "-c", str(config))
    assert await proc.exited() == 1
    errors = [line for line in proc.lines if "cannot start" in line]
    assert errors and REFUSED in errors[0], proc.lines
    assert "UNAUTHENTICATED" in errors[0]
    assert not any(token in line for line in proc.lines)
    assert not any(line.startswith("Traceback") for line in proc.lines)
    json.dumps(proc.lines)  # printable output only
