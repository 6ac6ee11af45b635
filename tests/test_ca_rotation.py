"""Intermediate and root rotation on a real CA directory, verified with real TLS handshakes (OpenSSL)."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from pathlib import Path

import pytest
from cryptography import x509

from mesh_gateway.identity.ca import init_ca, load_ca, validate_leaf
from mesh_gateway.identity.ca_rotation import (
    maintain,
    prune_roots,
    read_retired,
    rotate_intermediate,
    rotate_root,
)
from mesh_gateway.model import Credentials, SpiffeId

SERVER = SpiffeId("example.org", "/server")
CLIENT = SpiffeId("example.org", "/client")


def write_creds(tmp: Path, name: str, creds: Credentials) -> tuple[Path, Path]:
    cert, key = tmp / f"{name}.pem", tmp / f"{name}.key"
    cert.write_bytes(creds.cert_chain_pem)
    key.write_bytes(creds.key_pem)
    return cert, key


async def handshake(tmp: Path, server: Credentials, server_bundle: bytes, client: Credentials,
                    client_bundle: bytes) -> bool:
    """A real mTLS handshake over 127.0.0.1 plus one echoed byte; True when both sides accepted."""
    s_cert, s_key = write_creds(tmp, "s", server)
    c_cert, c_key = write_creds(tmp, "c", client)
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(s_cert, s_key)
    sctx.load_verify_locations(cadata=server_bundle.decode())
    sctx.verify_mode = ssl.CERT_REQUIRED
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.check_hostname = False
    cctx.load_cert_chain(c_cert, c_key)
    cctx.load_verify_locations(cadata=client_bundle.decode())

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(await reader.read(1))
            await writer.drain()
        except (ssl.SSLError, ConnectionError):
            pass
        finally:
            writer.close()

    server_sock = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=sctx)
    port = server_sock.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=cctx), 5)
        writer.write(b"x")
        data = await asyncio.wait_for(reader.read(1), 5)
        writer.close()
        return data == b"x"
    except (ssl.SSLError, ConnectionError):
        return False
    finally:
        server_sock.close()
        await server_sock.wait_closed()


async def test_root_rotation_cross_signs_and_prunes(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    old_ca = init_ca(directory, "example.org")
    old_bundle = old_ca.bundle_pem
    old_client = old_ca.issue_credentials(CLIENT, 3600)
    now = dt.datetime.now(dt.UTC)

    new_ca = rotate_root(directory, max_leaf_ttl_s=3600, now=now)
    assert len(new_ca.roots) == 2 and new_ca.roots[0] == old_ca.roots[0]
    assert new_ca.cross and new_ca.intermediate != old_ca.intermediate
    new_server = new_ca.issue_credentials(SERVER, 3600)
    assert new_server.cert_chain_pem.count(b"BEGIN CERTIFICATE") == 3  # leaf, intermediate, cross

    # a peer that still trusts only the old root verifies the new chain through the cross certificate
    leaf, *rest = x509.load_pem_x509_certificates(new_server.cert_chain_pem)
    validate_leaf(leaf, rest, old_ca.roots, SERVER)
    # overlap: the old-root client is accepted by a server trusting the new bundle, and it accepts the server
    assert await handshake(tmp_path, new_server, new_ca.bundle_pem, old_client, old_bundle)
    [retired] = read_retired(directory)
    assert retired.prune_after == now + dt.timedelta(seconds=7200)

    assert prune_roots(directory, now + dt.timedelta(seconds=7199)) == []
    assert prune_roots(directory, now + dt.timedelta(seconds=7200)) == [retired.fingerprint]
    pruned = load_ca(directory)
    assert pruned.roots == (new_ca.roots[1],) and pruned.cross == ()
    assert read_retired(directory) == []
    fresh_server = pruned.issue_credentials(SERVER, 3600)
    # after pruning the old-root client is refused
    assert not await handshake(tmp_path, fresh_server, pruned.bundle_pem, old_client, old_bundle)
    # while a client issued under the new root still connects
    new_client = pruned.issue_credentials(CLIENT, 3600)
    assert await handshake(tmp_path, fresh_server, pruned.bundle_pem, new_client, pruned.bundle_pem)


async def test_intermediate_rotation_keeps_bundle_and_old_leaves(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    ca = init_ca(directory, "example.org")
    old_client = ca.issue_credentials(CLIENT, 3600)
    rotated = rotate_intermediate(directory)
    assert rotated.intermediate != ca.intermediate and rotated.bundle_pem == ca.bundle_pem
    server = rotated.issue_credentials(SERVER, 3600)
    assert await handshake(tmp_path, server, rotated.bundle_pem, old_client, ca.bundle_pem)


def test_intermediate_prepared_at_half_and_activated_at_one_sixth(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    ca = init_ca(directory, "example.org")
    start = ca.intermediate.not_valid_before_utc
    life = ca.intermediate.not_valid_after_utc - start
    assert not maintain(directory, start + life * 0.4).changed
    at_half = maintain(directory, start + life * 0.55)
    assert at_half.prepared and not at_half.activated
    assert (directory / "next-intermediate.key").stat().st_mode & 0o777 == 0o600
    assert load_ca(directory).intermediate == ca.intermediate  # prepared, not yet issuing
    assert not maintain(directory, start + life * 0.7).changed
    late = start + life * 0.86
    done = maintain(directory, late)
    assert done.activated
    renewed = load_ca(directory)
    assert renewed.intermediate != ca.intermediate
    leaf = renewed.issue(ca.intermediate_key.public_key(), SERVER, 60, now=late)
    assert leaf.issuer == renewed.intermediate.subject
    assert not (directory / "next-intermediate.pem").exists()


def test_rotate_root_requires_positive_ttl(tmp_path: Path) -> None:
    from mesh_gateway.identity.ca import CAError

    init_ca(tmp_path / "ca", "example.org")
    with pytest.raises(CAError):
        rotate_root(tmp_path / "ca", max_leaf_ttl_s=0)


def test_damaged_prepared_intermediate_does_not_block_activation(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    ca = init_ca(directory, "example.org")
    start = ca.intermediate.not_valid_before_utc
    life = ca.intermediate.not_valid_after_utc - start
    assert maintain(directory, start + life * 0.55).prepared
    (directory / "next-intermediate.key").write_bytes(b"garbage")
    assert maintain(directory, start + life * 0.9).activated
    assert load_ca(directory).intermediate != ca.intermediate
