"""`mesh-gateway ca token create | serve | rotate | bundle` as a user runs them."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from mesh_gateway.cli import main
from mesh_gateway.identity.ca import load_ca
from mesh_gateway.identity.issuer_api import IssuerClient, IssuerRpcError, build_csr
from mesh_gateway.identity.rotation import credentials_from_chain
from mesh_gateway.model import SpiffeId
from tests.support import reap

WEB = SpiffeId("example.org", "/web")


def test_token_rotate_bundle_commands(tmp_path: Path, capsys: object) -> None:
    d = str(tmp_path / "certs")
    assert main(["ca", "init", "--dir", d, "--trust-domain", "example.org"]) == 0
    assert main(["ca", "token", "create", "--dir", d, "--spiffe-id", "spiffe://other.org/web"]) == 2
    capsys.readouterr()  # type: ignore[attr-defined]
    assert main(["ca", "token", "create", "--dir", d, "--spiffe-id", str(WEB), "--ttl", "15m"]) == 0
    token = capsys.readouterr().out.strip()  # type: ignore[attr-defined]
    assert re.fullmatch(r"[A-Za-z0-9_-]{40,}", token)
    assert token not in (tmp_path / "certs" / "join-tokens.json").read_text()
    assert (tmp_path / "certs" / "join-tokens.json").stat().st_mode & 0o777 == 0o600
    assert main(["ca", "rotate", "--dir", d]) == 0
    assert "new intermediate" in capsys.readouterr().out  # type: ignore[attr-defined]
    assert main(["ca", "rotate", "--dir", d, "--root", "--max-leaf-ttl", "1h"]) == 0
    assert "bundle holds 2 roots" in capsys.readouterr().out  # type: ignore[attr-defined]
    assert main(["ca", "bundle", "--dir", d]) == 0
    out = capsys.readouterr()  # type: ignore[attr-defined]
    assert len(x509.load_pem_x509_certificates(out.out.encode())) == 2
    assert out.err.count("# root") == 2
    assert main(["ca", "maintain", "--dir", d]) == 0


async def test_ca_serve_bootstraps_a_workload_and_stops_on_sigterm(tmp_path: Path) -> None:
    d = tmp_path / "certs"
    assert main(["ca", "init", "--dir", str(d), "--trust-domain", "example.org"]) == 0
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh_gateway", "ca", "serve", "--dir", str(d), "--listen", "127.0.0.1:0",
        "--bootstrap-listen", "127.0.0.1:0", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        ports = re.findall(r"127\.0\.0\.1:(\d+)", line)
        assert len(ports) == 2, line
        token = subprocess.run([sys.executable, "-m", "mesh_gateway", "ca", "token", "create", "--dir", str(d),
                                "--spiffe-id", str(WEB)], capture_output=True, text=True, check=True).stdout.strip()
        ca = load_ca(d)
        client = IssuerClient(f"127.0.0.1:{ports[0]}", bootstrap_address=f"127.0.0.1:{ports[1]}",
                              bundle_pem=ca.bundle_pem, server_name="localhost")
        key = ec.generate_private_key(ec.SECP256R1())
        signed = await client.sign_csr(build_csr(key, WEB), 600, join_token=token)
        creds = credentials_from_chain(WEB, key, signed, time.time())
        assert creds.spiffe_id == WEB
        try:
            await client.sign_csr(build_csr(key, WEB), 600, join_token=token)
            raise AssertionError("a used token was accepted")
        except IssuerRpcError as exc:
            assert exc.code == "UNAUTHENTICATED"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 20)
        await reap(proc)
    assert code == 0
