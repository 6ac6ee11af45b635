"""HTTP/2 at the edge: ALPN h2 on the TLS listener, through the same pipeline to HTTP/1.1 mTLS upstreams."""

from __future__ import annotations

import asyncio
import os

import httpx
import pytest

from mesh_gateway.app import Gateway
from tests.grpc_support import DenyMethods
from tests.support import CLIENT_ID, GATEWAY_ID, WEB_ID, client_ssl, gateway_config, running, url


def web_catalog(upstream) -> dict[str, list[dict[str, object]]]:
    return {"web": [{"address": upstream.host, "port": upstream.port, "spiffe_id": WEB_ID}]}


def h2_servers(gw) -> list:
    return [runner.h2_server for runner in gw._runners if getattr(runner, "h2_server", None) is not None]


def h2_client(ca, creds, *, http2: bool = True) -> httpx.AsyncClient:
    return httpx.AsyncClient(http2=http2, verify=client_ssl(ca.bundle_pem, creds), timeout=30)


async def test_h2_client_gets_http2_responses_from_http1_upstream(ca, ca_dir, web_upstream, client_creds):
    async with running(gateway_config(ca_dir, web_catalog(web_upstream))) as gw, h2_client(ca, client_creds) as client:
        resp = await client.get(url(gw, "/hello?x=1"), headers={"x-spiffe-id": "spiffe://mesh.local/forged"})
    assert resp.http_version == "HTTP/2"
    assert resp.status_code == 200
    report = resp.json()
    assert report["path"] == "/hello?x=1"
    assert report["caller"] == GATEWAY_ID
    assert report["headers"]["x-forwarded-client-cert"] == f"By={GATEWAY_ID};URI={CLIENT_ID}"
    assert "x-spiffe-id" not in report["headers"]
    assert resp.headers["x-upstream"] == "web"


async def test_h2_bodies_stream_both_ways_under_flow_control(ca, ca_dir, web_upstream, client_creds):
    payload = os.urandom(3 * 1024 * 1024)  # several times the stream window: the body must be paced, not buffered
    async with running(gateway_config(ca_dir, web_catalog(web_upstream))) as gw, h2_client(ca, client_creds) as client:
        echoed = await client.post(url(gw, "/echo"), content=payload)
        big = await client.get(url(gw, "/bytes/5000000"))
    assert echoed.http_version == "HTTP/2" and echoed.status_code == 200
    assert echoed.content == payload
    assert len(big.content) == 5_000_000


async def test_h2_multiplexes_concurrent_requests_on_one_connection(ca, ca_dir, web_upstream, client_creds):
    async with running(gateway_config(ca_dir, web_catalog(web_upstream))) as gw, h2_client(ca, client_creds) as client:
        responses = await asyncio.gather(*(client.get(url(gw, f"/n/{i}")) for i in range(30)))
        edge_connections = sum(len(server.connections) for server in h2_servers(gw))
    assert [r.json()["path"] for r in responses] == [f"/n/{i}" for i in range(30)]
    assert {r.http_version for r in responses} == {"HTTP/2"}
    assert edge_connections == 1


async def test_http1_clients_share_the_listener(ca, ca_dir, web_upstream, client_creds):
    async with running(gateway_config(ca_dir, web_catalog(web_upstream))) as gw, \
            h2_client(ca, client_creds, http2=False) as client:
        resp = await client.get(url(gw, "/one"))
    assert resp.http_version == "HTTP/1.1"
    assert resp.json()["path"] == "/one"


async def test_http2_can_be_turned_off_per_listener(ca, ca_dir, web_upstream, client_creds):
    config = gateway_config(ca_dir, web_catalog(web_upstream), listeners=[
        {"name": "public", "address": "127.0.0.1:0", "tls": {"client_auth": "optional"}, "http2": False}])
    async with running(config) as gw, h2_client(ca, client_creds) as client:
        resp = await client.get(url(gw, "/"))
    assert resp.http_version == "HTTP/1.1"


async def test_h2_denied_and_unrouted_requests_get_json_errors(ca, ca_dir, web_upstream, client_creds):
    config = gateway_config(ca_dir, web_catalog(web_upstream),
                            routes=[{"name": "api", "match": {"path_prefix": "/api/"}, "service": "web"}])
    async with running(config, authorizer=DenyMethods("/api/secret")) as gw, h2_client(ca, client_creds) as client:
        denied = await client.get(url(gw, "/api/secret"))
        unrouted = await client.get(url(gw, "/elsewhere"))
        allowed = await client.get(url(gw, "/api/open"))
    assert (denied.http_version, denied.status_code, denied.json()["error"]) == ("HTTP/2", 403, "forbidden")
    assert (unrouted.status_code, unrouted.json()["error"]) == (404, "no route")
    assert allowed.status_code == 200


async def test_grpc_sent_to_the_http_listener_is_told_where_to_go(ca, ca_dir, web_upstream, client_creds):
    async with running(gateway_config(ca_dir, web_catalog(web_upstream))) as gw, h2_client(ca, client_creds) as client:
        resp = await client.post(url(gw, "/pkg.Svc/Method"), content=b"\x00\x00\x00\x00\x00",
                                 headers={"content-type": "application/grpc", "te": "trailers"})
    assert resp.status_code == 200
    assert resp.headers["grpc-status"] == "12"


@pytest.mark.parametrize("declared", [True, False])
async def test_h2_oversized_body_is_refused_whether_declared_or_streamed(ca, ca_dir, web_upstream, client_creds,
                                                                        declared):
    async def stream():
        for _ in range(64):
            yield b"x" * 1024

    config = gateway_config(ca_dir, web_catalog(web_upstream), limits={"max_body_bytes": 4096})
    async with running(config) as gw, h2_client(ca, client_creds) as client:
        resp = await client.post(url(gw, "/echo"), content=b"x" * 65536 if declared else stream())
    assert resp.status_code == 413
    assert resp.json()["error"] == "request body too large"


async def test_stop_drains_in_flight_h2_streams(ca, ca_dir, web_upstream, client_creds):
    gw = Gateway(gateway_config(ca_dir, web_catalog(web_upstream)))
    await gw.start()
    try:
        async with h2_client(ca, client_creds) as client:
            pending = asyncio.ensure_future(client.get(url(gw, "/slow?seconds=0.5")))
            async with asyncio.timeout(10):
                while not any(conn.streams for server in h2_servers(gw) for conn in server.connections):
                    await asyncio.sleep(0.01)
            await gw.stop()
            resp = await pending
    finally:
        await gw.stop()
    assert resp.status_code == 200
    assert resp.http_version == "HTTP/2"


async def test_h2_paths_are_normalised_before_routing_and_policy(ca, ca_dir, web_upstream, client_creds):
    config = gateway_config(ca_dir, web_catalog(web_upstream))
    async with running(config, authorizer=DenyMethods("/admin")) as gw, h2_client(ca, client_creds) as client:
        sneaky = await client.get(url(gw, "/public/%2e%2e/admin"))
        encoded_slash = await client.get(url(gw, "/public/..%2Fadmin"))
        fine = await client.get(url(gw, "/public/./x"))
    assert (sneaky.http_version, sneaky.status_code) == ("HTTP/2", 403)
    assert encoded_slash.status_code == 400
    assert fine.json()["path"] == "/public/x"
