"""The HTTP/1.1 wire as a client sees it on the default (h1) server: keep-alive, pipelining, framing, 100-continue,
upgrades, and what is refused before a request is complete. Raw sockets, so every byte is the gateway's."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from mesh_gateway.config import Limits
from mesh_gateway.edges.http import HttpEdge
from mesh_gateway.edges.listener import HttpListener
from mesh_gateway.model import Catalog, Endpoint, EndpointSet, Route, RouteMatch, RoutePolicy, RouteTable, SpiffeId
from mesh_gateway.model import Response as ModelResponse
from mesh_gateway.pipeline import AllowAll, Pipeline
from mesh_gateway.process import bind
from mesh_gateway.routing import compile_routes
from mesh_gateway.watch import Watch
from tests.support import gateway_config, running
from tests.test_edge_e2e import web_catalog

Response = tuple[int, dict[str, str], bytes]


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ", 2)[1]), headers


async def read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "content-length" in headers:
        return await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 10)
    if headers.get("transfer-encoding") != "chunked":
        return await asyncio.wait_for(reader.read(), 10)  # close-delimited
    body = b""
    while True:
        size = int((await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)).strip(), 16)
        body += (await asyncio.wait_for(reader.readexactly(size + 2), 10))[:-2]
        if size == 0:
            return body


async def read_response(reader: asyncio.StreamReader, *, method: str = "GET") -> Response:
    status, headers = await read_head(reader)
    if method == "HEAD" or status in (100, 204, 304):
        return status, headers, b""
    return status, headers, await read_body(reader, headers)


async def connect(gw) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:  # type: ignore[no-untyped-def]
    host, port = gw.addresses["public"]
    return await asyncio.open_connection(host, port)


async def closed(reader: asyncio.StreamReader) -> bool:
    return await asyncio.wait_for(reader.read(1), 10) == b""


@pytest.fixture
def config(ca_dir, web_upstream):  # type: ignore[no-untyped-def]
    return gateway_config(ca_dir, web_catalog(web_upstream), tls=False,
                          routes=[{"name": "api", "match": {"path_prefix": "/api"}, "service": "web"}],
                          limits={"max_header_bytes": 4096})


async def test_pipelined_requests_are_answered_in_order(config):
    async with running(config) as gw:
        reader, writer = await connect(gw)
        writer.write(b"".join(f"GET /api/{n} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for n in ("a", "b", "c")))
        paths = [json.loads((await read_response(reader))[2])["path"] for _ in range(3)]
        writer.close()
    assert paths == ["/api/a", "/api/b", "/api/c"]


async def test_http10_is_closed_after_the_response_unless_it_asks_for_keep_alive(config):
    async with running(config) as gw:
        reader, writer = await connect(gw)
        writer.write(b"GET /api/ HTTP/1.0\r\nHost: x\r\n\r\n")
        status, headers, _ = await read_response(reader)
        assert status == 200 and headers["connection"] == "close"
        assert await closed(reader)
        writer.close()

        reader, writer = await connect(gw)
        for _ in range(2):
            writer.write(b"GET /api/ HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
            status, headers, _ = await read_response(reader)
            assert status == 200 and headers["connection"] == "keep-alive"
        writer.close()


async def test_head_answer_has_the_length_but_no_body(config):
    async with running(config) as gw:
        reader, writer = await connect(gw)
        writer.write(b"GET /api/x HTTP/1.1\r\nHost: x\r\n\r\nHEAD /api/x HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /api/next HTTP/1.1\r\nHost: x\r\n\r\n")
        await read_response(reader)
        status, headers, _ = await read_response(reader, method="HEAD")
        assert status == 200 and int(headers["content-length"]) > 0
        # Had body bytes followed the HEAD answer, this would not parse as the next response.
        assert json.loads((await read_response(reader))[2])["path"] == "/api/next"
        writer.close()


async def test_streamed_response_is_chunked_for_http11_and_close_delimited_for_http10(config):
    # The upstream echoes the body as a stream of unknown length; at 1 MiB it is still arriving when the gateway
    # starts answering (the upstream client buffers at most HIGH_WATER), so the gateway must frame it itself.
    payload = bytes(range(256)) * 4096
    async with running(config) as gw:
        for minor in (1, 0):
            reader, writer = await connect(gw)
            writer.write(f"POST /api/echo HTTP/1.{minor}\r\nHost: x\r\nContent-Length: {len(payload)}\r\n\r\n"
                         .encode() + payload)
            status, headers, body = await read_response(reader)
            writer.close()
            assert (status, body) == (200, payload)
            assert "content-length" not in headers
            if minor == 1:
                assert headers["transfer-encoding"] == "chunked"
            else:
                assert "transfer-encoding" not in headers and headers["connection"] == "close"


async def test_100_continue_is_sent_only_for_a_request_that_was_admitted(config):
    async with running(config) as gw:
        reader, writer = await connect(gw)
        writer.write(b"POST /api/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        assert (await read_response(reader))[0] == 100
        writer.write(b"hello")
        assert (await read_response(reader))[::2] == (200, b"hello")
        writer.close()

        reader, writer = await connect(gw)
        writer.write(b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        status, _, body = await read_response(reader)
        assert status == 404 and json.loads(body)["error"] == "no route"
        writer.close()


async def test_h2c_upgrade_is_ignored_and_the_request_served_as_http11(config):
    async with running(config) as gw:
        reader, writer = await connect(gw)
        writer.write(b"GET /api/one HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                     b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
                     b"GET /api/two HTTP/1.1\r\nHost: x\r\n\r\n")
        first = json.loads((await read_response(reader))[2])
        second = json.loads((await read_response(reader))[2])
        writer.close()
    assert (first["path"], second["path"]) == ("/api/one", "/api/two")
    assert "upgrade" not in first["headers"] and "http2-settings" not in first["headers"]


@pytest.mark.parametrize(("unfinished", "status", "error"), [
    (b"GET /api/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 65536, 431, "request headers too large"),
    (b"GET /api/" + b"a" * 65536, 414, "request target too long"),
])
async def test_head_over_twice_the_limit_is_refused_before_it_is_complete(config, unfinished, status, error):
    async with running(config) as gw:
        reader, writer = await connect(gw)
        writer.write(unfinished)  # the head never ends: the gateway must not wait for it, nor keep it all
        got, headers, body = await read_response(reader)
        assert (got, headers["connection"], json.loads(body)["error"]) == (status, "close", error)
        assert await closed(reader)
        writer.close()


@pytest.mark.parametrize("request_bytes", [
    b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    # Both framings at once is how requests are smuggled past proxies: refused, never guessed.
    b"POST /api/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /api/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n",
])
async def test_requests_that_cannot_be_read_safely_get_400_and_a_close(config, request_bytes):
    async with running(config) as gw:
        reader, writer = await connect(gw)
        writer.write(request_bytes)
        status, headers, _ = await read_response(reader)
        assert status == 400 and headers["connection"] == "close"
        assert await closed(reader)
        writer.close()


class BrokenStreamForwarder:
    """An upstream leg whose body stream fails with something that is not a GatewayError (a bug, not a client)."""

    async def forward(self, request, endpoint, route, exchange):  # type: ignore[no-untyped-def]
        async def body() -> AsyncIterator[bytes]:
            yield b"first part"
            raise RuntimeError("bug in a body stream")

        return ModelResponse(200, [("content-type", "text/plain")], body())


async def test_a_failure_inside_the_server_closes_that_connection_and_serves_the_next():
    endpoint = Endpoint("127.0.0.1", 9, tls="plain")
    route = Route("all", RouteMatch(), "svc", RoutePolicy(authz_enabled=False, upstream_security="plain"))
    pipeline = Pipeline(routes=Watch(compile_routes(RouteTable((route,)))),
                        catalog=Watch(Catalog({"svc": EndpointSet("svc", (endpoint,))})), authorizer=AllowAll(),
                        forwarder=BrokenStreamForwarder(), gateway_id=lambda: SpiffeId("mesh.local", "/gw"))
    listener = HttpListener(HttpEdge(name="public", pipeline=pipeline, limits=Limits(), tls=False),
                            ssl_context=None, drain_timeout_s=1)
    sock = bind("127.0.0.1:0")
    await listener.start(sock)
    host, port = sock.getsockname()[:2]
    try:
        for _ in range(2):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers = await read_head(reader)
            rest = await asyncio.wait_for(reader.read(), 10)  # ends: the gateway cut the connection
            writer.close()
            # The body never looks whole: the terminating chunk is missing.
            assert (status, headers["transfer-encoding"]) == (200, "chunked")
            assert b"first part" in rest and not rest.endswith(b"0\r\n\r\n")
    finally:
        await listener.cleanup()
