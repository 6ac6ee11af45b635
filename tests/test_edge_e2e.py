"""End to end: client → gateway (TLS, client cert) → mTLS upstream, over real sockets and our own CA."""

from __future__ import annotations

import asyncio
import json
import os

import aiohttp
import pytest

from mesh_gateway.demo.upstream import RunningUpstream, start_upstream
from tests.support import CLIENT_ID, GATEWAY_ID, WEB_ID, client_ssl, gateway_config, issue, running, url


def web_catalog(upstream: RunningUpstream, spiffe_id: str = WEB_ID) -> dict[str, list[dict[str, object]]]:
    return {"web": [{"address": upstream.host, "port": upstream.port, "spiffe_id": spiffe_id}]}


async def test_get_through_gateway_reaches_upstream_with_gateway_identity(ca, ca_dir, web_upstream, client_creds):
    config = gateway_config(ca_dir, web_catalog(web_upstream))
    async with running(config) as gw, aiohttp.ClientSession() as client:
        async with client.get(url(gw, "/hello?x=1"), ssl=client_ssl(ca.bundle_pem, client_creds)) as resp:
            assert resp.status == 200
            report = await resp.json()
    assert report["path"] == "/hello?x=1"
    assert report["caller"] == GATEWAY_ID
    assert report["headers"]["x-forwarded-client-cert"] == f"By={GATEWAY_ID};URI={CLIENT_ID}"
    assert report["headers"]["x-forwarded-proto"] == "https"
    assert report["headers"]["x-request-id"]


@pytest.mark.parametrize("size", [0, 1024 * 1024])
async def test_body_round_trips_intact(ca, ca_dir, web_upstream, client_creds, size):
    payload = os.urandom(size)
    config = gateway_config(ca_dir, web_catalog(web_upstream))
    async with running(config) as gw, aiohttp.ClientSession() as client, client.post(url(gw, "/echo"), data=payload,
                           ssl=client_ssl(ca.bundle_pem, client_creds)) as resp:
        assert resp.status == 200
        assert await resp.read() == payload


async def test_chunked_request_body_is_streamed(ca, ca_dir, web_upstream, client_creds):
    chunks = [os.urandom(50_000) for _ in range(20)]

    async def produce():
        for chunk in chunks:
            yield chunk

    config = gateway_config(ca_dir, web_catalog(web_upstream))
    async with running(config) as gw, aiohttp.ClientSession() as client:
        async with client.post(url(gw, "/echo"), data=produce(),
                               ssl=client_ssl(ca.bundle_pem, client_creds)) as resp:
            assert resp.status == 200
            assert await resp.read() == b"".join(chunks)


async def test_large_response_streams(ca, ca_dir, web_upstream, client_creds):
    config = gateway_config(ca_dir, web_catalog(web_upstream))
    async with running(config) as gw, aiohttp.ClientSession() as client:
        async with client.get(url(gw, "/bytes/3000000"), ssl=client_ssl(ca.bundle_pem, client_creds)) as resp:
            assert resp.status == 200
            assert len(await resp.read()) == 3_000_000


async def test_upstream_with_wrong_spiffe_id_gets_502_and_nothing_forwarded(ca, ca_dir, client_creds):
    hits = []
    impostor = await start_upstream("impostor", issue(ca, "spiffe://mesh.local/ns/default/sa/impostor"))
    try:
        config = gateway_config(ca_dir, web_catalog(impostor, WEB_ID))
        async with running(config) as gw, aiohttp.ClientSession() as client:
            async with client.get(url(gw, "/x"), ssl=client_ssl(ca.bundle_pem, client_creds)) as resp:
                assert resp.status == 502
                body = await resp.json()
                hits.append(resp.headers.get("x-upstream"))
        assert body["error"] == "upstream identity rejected"
        assert "impostor" not in json.dumps(body)
        assert hits == [None]
    finally:
        await impostor.close()


async def test_no_route_is_404_json(ca, ca_dir, web_upstream, client_creds):
    config = gateway_config(ca_dir, web_catalog(web_upstream),
                            routes=[{"name": "api", "match": {"path_prefix": "/api/"}, "service": "web"}])
    async with running(config) as gw, aiohttp.ClientSession() as client:
        async with client.get(url(gw, "/other"), ssl=client_ssl(ca.bundle_pem, client_creds)) as resp:
            assert resp.status == 404
            body = await resp.json()
    assert body["error"] == "no route"
    assert body["request_id"]


async def test_upstream_down_is_502_quickly(ca, ca_dir, client_creds):
    config = gateway_config(ca_dir, {"web": [{"address": "127.0.0.1", "port": 1, "spiffe_id": WEB_ID}]})
    async with running(config) as gw, aiohttp.ClientSession() as client:
        async with asyncio.timeout(5):
            async with client.get(url(gw, "/"), ssl=client_ssl(ca.bundle_pem, client_creds)) as resp:
                assert resp.status == 502


async def test_ipv6_upstream_endpoint(ca, ca_dir, client_creds):
    import socket as _socket

    if not _socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    try:
        upstream = await start_upstream("web6", issue(ca, WEB_ID), host="::1")
    except OSError as exc:
        pytest.skip(f"cannot listen on ::1: {exc}")
    try:
        config = gateway_config(ca_dir, {"web": [{"address": "::1", "port": upstream.port, "spiffe_id": WEB_ID}]})
        async with running(config) as gw, aiohttp.ClientSession() as client:
            async with client.get(url(gw, "/six"), ssl=client_ssl(ca.bundle_pem, client_creds)) as resp:
                assert resp.status == 200
                assert (await resp.json())["service"] == "web6"
    finally:
        await upstream.close()
