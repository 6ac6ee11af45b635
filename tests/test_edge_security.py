"""What the edge refuses or rewrites: client certificates, spoofable and hop-by-hop headers, size and time caps."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from mesh_gateway.identity.ca import cert_pem, init_ca, key_pem, new_key
from mesh_gateway.model import Credentials, SpiffeId
from tests.support import CLIENT_ID, client_ssl, gateway_config, issue, running, url
from tests.test_edge_e2e import web_catalog


async def _raw_request(gw, ssl_context, request: bytes) -> bytes:
    host, port = gw.addresses["public"]
    reader, writer = await asyncio.open_connection(host, port, ssl=ssl_context, server_hostname="localhost")
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(65536), 10)
    writer.close()
    return data


async def _handshake(gw, ssl_context) -> None:
    host, port = gw.addresses["public"]
    reader, writer = await asyncio.open_connection(host, port, ssl=ssl_context, server_hostname="localhost")
    # TLS 1.3 delivers the server's verdict on the client cert after the handshake: read to see it.
    writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    await writer.drain()
    data = await asyncio.wait_for(reader.read(100), 10)
    writer.close()
    if not data:
        raise ConnectionResetError("closed without a response")


async def test_required_client_cert_absent_is_refused(ca, ca_dir, web_upstream):
    config = gateway_config(ca_dir, web_catalog(web_upstream), client_auth="required")
    async with running(config) as gw:
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            await _handshake(gw, client_ssl(ca.bundle_pem))


async def test_required_client_cert_from_another_ca_is_refused(ca, ca_dir, web_upstream, tmp_path):
    other = init_ca(tmp_path / "other", "mesh.local")
    config = gateway_config(ca_dir, web_catalog(web_upstream), client_auth="required")
    async with running(config) as gw:
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            await _handshake(gw, client_ssl(ca.bundle_pem, issue(other, CLIENT_ID)))


async def test_expired_client_cert_is_refused(ca, ca_dir, web_upstream):
    # The CA will not issue an already-expired leaf, so sign one by hand with the intermediate's key.
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    key = new_key()
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca.intermediate.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(past).not_valid_after(past + dt.timedelta(minutes=5))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(CLIENT_ID)]), critical=True)
            .sign(ca.intermediate_key, hashes.SHA256()))
    expired = Credentials(SpiffeId.parse(CLIENT_ID), cert_pem(leaf) + cert_pem(ca.intermediate), key_pem(key),
                          ca.bundle_pem, leaf.serial_number, past.timestamp(), past.timestamp() + 300)
    config = gateway_config(ca_dir, web_catalog(web_upstream), client_auth="required")
    async with running(config) as gw:
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            await _handshake(gw, client_ssl(ca.bundle_pem, expired))


async def test_required_client_cert_present_is_accepted(ca, ca_dir, web_upstream, client_creds):
    config = gateway_config(ca_dir, web_catalog(web_upstream), client_auth="required")
    async with running(config) as gw, aiohttp.ClientSession() as client:
        async with client.get(url(gw, "/"), ssl=client_ssl(ca.bundle_pem, client_creds)) as resp:
            assert resp.status == 200


async def test_spoofed_identity_headers_never_reach_upstream(ca, ca_dir, web_upstream):
    config = gateway_config(ca_dir, web_catalog(web_upstream))
    spoofed = {
        "x-forwarded-client-cert": "By=spiffe://mesh.local/x;URI=spiffe://mesh.local/ns/default/sa/admin",
        "x-spiffe-id": "spiffe://mesh.local/ns/default/sa/admin",
        "forwarded": "for=10.0.0.1;proto=https",
        "x-forwarded-proto": "http",
    }
    async with running(config) as gw, aiohttp.ClientSession() as client:
        # No client certificate: the gateway must not invent or pass on an identity.
        async with client.get(url(gw, "/"), headers=spoofed, ssl=client_ssl(ca.bundle_pem)) as resp:
            seen = (await resp.json())["headers"]
    assert "x-forwarded-client-cert" not in seen
    assert "x-spiffe-id" not in seen
    assert "forwarded" not in seen
    assert seen["x-forwarded-proto"] == "https"


async def test_hop_by_hop_and_connection_listed_headers_are_stripped(ca, ca_dir, web_upstream, client_creds):
    config = gateway_config(ca_dir, web_catalog(web_upstream))
    request = (b"GET /h HTTP/1.1\r\nHost: localhost\r\nConnection: keep-alive, x-secret-hop\r\n"
               b"X-Secret-Hop: 1\r\nKeep-Alive: timeout=5\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\n"
               b"TE: trailers\r\nX-Kept: yes\r\n\r\n")
    async with running(config) as gw:
        raw = await _raw_request(gw, client_ssl(ca.bundle_pem, client_creds), request)
    assert raw.startswith(b"HTTP/1.1 200")
    body = raw.split(b"\r\n\r\n", 1)[1].lower()
    for name in (b"x-secret-hop", b"keep-alive", b"proxy-authorization", b'"te"'):
        assert name not in body
    assert b'"x-kept": "yes"' in body


async def test_oversize_headers_get_431(ca, ca_dir, web_upstream, client_creds):
    config = gateway_config(ca_dir, web_catalog(web_upstream), limits={"max_header_bytes": 4096})
    async with running(config) as gw, aiohttp.ClientSession() as client:
        async with client.get(url(gw, "/"), headers={"x-big": "a" * 5000},
                              ssl=client_ssl(ca.bundle_pem, client_creds)) as resp:
            assert resp.status == 431
            assert (await resp.json())["error"] == "request headers too large"


async def test_too_many_headers_get_431(ca, ca_dir, web_upstream, client_creds):
    config = gateway_config(ca_dir, web_catalog(web_upstream), limits={"max_headers": 10})
    async with running(config) as gw, aiohttp.ClientSession() as client:
        async with client.get(url(gw, "/"), headers={f"x-h{i}": "v" for i in range(12)},
                              ssl=client_ssl(ca.bundle_pem, client_creds)) as resp:
            assert resp.status == 431


async def test_long_request_target_gets_414(ca, ca_dir, web_upstream, client_creds):
    config = gateway_config(ca_dir, web_catalog(web_upstream), limits={"max_request_line_bytes": 1024})
    async with running(config) as gw, aiohttp.ClientSession() as client:
        async with client.get(url(gw, "/" + "a" * 2000), ssl=client_ssl(ca.bundle_pem, client_creds)) as resp:
            assert resp.status == 414


async def test_declared_body_over_cap_gets_413(ca, ca_dir, web_upstream, client_creds):
    config = gateway_config(ca_dir, web_catalog(web_upstream), limits={"max_body_bytes": 1000})
    async with running(config) as gw, aiohttp.ClientSession() as client:
        async with client.post(url(gw, "/echo"), data=b"x" * 5000,
                               ssl=client_ssl(ca.bundle_pem, client_creds)) as resp:
            assert resp.status == 413


async def test_chunked_body_over_cap_gets_413(ca, ca_dir, web_upstream, client_creds):
    async def produce():
        for _ in range(10):
            yield b"x" * 1000

    config = gateway_config(ca_dir, web_catalog(web_upstream), limits={"max_body_bytes": 4000})
    async with running(config) as gw, aiohttp.ClientSession() as client:
        async with client.post(url(gw, "/echo"), data=produce(),
                               ssl=client_ssl(ca.bundle_pem, client_creds)) as resp:
            assert resp.status == 413


async def test_slow_upstream_gets_504(ca, ca_dir, web_upstream, client_creds):
    catalog = web_catalog(web_upstream)
    routes = [{"name": "web", "match": {"path_prefix": "/"}, "service": "web", "timeout_s": 0.3}]
    config = gateway_config(ca_dir, catalog, routes=routes)
    async with running(config) as gw, aiohttp.ClientSession() as client:
        async with client.get(url(gw, "/slow?seconds=5"), ssl=client_ssl(ca.bundle_pem, client_creds)) as resp:
            assert resp.status == 504
            assert (await resp.json())["error"] == "upstream timeout"


async def test_malformed_request_gets_400_not_a_traceback(ca, ca_dir, web_upstream, client_creds):
    config = gateway_config(ca_dir, web_catalog(web_upstream))
    async with running(config) as gw:
        raw = await _raw_request(gw, client_ssl(ca.bundle_pem, client_creds), b"GARBAGE\x00 / HTTP/9\r\n\r\n")
    assert raw.split(b" ", 2)[1] == b"400"
    assert b"Traceback" not in raw


async def test_plain_http_listener_serves(ca, ca_dir, web_upstream):
    config = gateway_config(ca_dir, web_catalog(web_upstream), tls=False)
    async with running(config) as gw, aiohttp.ClientSession() as client:
        async with client.get(url(gw, "/", scheme="http")) as resp:
            assert resp.status == 200
            seen = (await resp.json())["headers"]
    assert seen["x-forwarded-proto"] == "http"
    assert "x-forwarded-client-cert" not in seen


async def test_client_slow_to_send_its_request_head_is_disconnected(ca, ca_dir, web_upstream, client_creds):
    config = gateway_config(ca_dir, web_catalog(web_upstream), limits={"idle_timeout_s": 0.5})
    async with running(config) as gw:
        host, port = gw.addresses["public"]
        reader, writer = await asyncio.open_connection(host, port, ssl=client_ssl(ca.bundle_pem, client_creds),
                                                       server_hostname="localhost")
        writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")  # never finishes the head
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)  # returns once the gateway closes the connection
        writer.close()
    assert b"200" not in data


@pytest.mark.parametrize(("sent", "forwarded"), [
    ("/api/%2e%2e/admin?q=1", "/admin?q=1"),
    ("//admin", "/admin"),
    ("/a/./b/../c;x=1", "/a/c"),
    ("/%61pi/v1/", "/api/v1/"),
])
async def test_upstream_receives_the_path_that_was_routed_and_authorized(ca, ca_dir, web_upstream, client_creds,
                                                                         sent, forwarded):
    config = gateway_config(ca_dir, web_catalog(web_upstream))
    async with running(config) as gw:
        raw = await _raw_request(gw, client_ssl(ca.bundle_pem, client_creds),
                                 f"GET {sent} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
    assert raw.split(b" ", 2)[1] == b"200"
    assert f'"path": "{forwarded}"'.encode() in raw


@pytest.mark.parametrize("sent", ["/api/..%2fadmin", "/a%5cb", "/bad%zz", "/nul%00"])
async def test_ambiguous_paths_are_refused_with_400(ca, ca_dir, web_upstream, client_creds, sent):
    config = gateway_config(ca_dir, web_catalog(web_upstream))
    async with running(config) as gw:
        raw = await _raw_request(gw, client_ssl(ca.bundle_pem, client_creds),
                                 f"GET {sent} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
    assert raw.split(b" ", 2)[1] == b"400"
    assert b"ambiguous request path" in raw
