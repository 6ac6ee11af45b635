"""The httptools forwarder (upstream.client: h1) against real upstreams, including ones that misbehave on purpose.

The lead's end-to-end suite runs against the default client (h1); these cover what only a hand-written client
can get wrong: keep-alive reuse, a server closing idle connections, early answers to uploads, HEAD, and both
clients giving the same answers.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from mesh_gateway.demo.upstream import RunningUpstream
from tests.support import WEB_ID, client_ssl, gateway_config, running, url

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawUpstream:
    """A plain HTTP/1.1 server written by hand, so the test controls exactly what goes on the wire."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> RawUpstream:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port


async def read_head(reader: asyncio.StreamReader) -> tuple[str, dict[str, str]]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    request_line, *lines = head.split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}
    return request_line, headers


def plain(port: int) -> dict[str, list[dict[str, object]]]:
    return {"web": [{"address": "127.0.0.1", "port": port, "tls": "plain"}]}


async def test_sequential_requests_reuse_one_upstream_connection(ca, ca_dir):
    async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()

    async with RawUpstream(keep_alive) as upstream, running(
            gateway_config(ca_dir, plain(upstream.port), tls=False)) as gw, aiohttp.ClientSession() as client:
        for _ in range(5):
            async with client.get(url(gw, "/", scheme="http")) as resp:
                assert resp.status == 200
                assert await resp.read() == b"ok"
    assert upstream.connections == 1


async def test_server_closing_idle_keepalive_connection_is_retried_not_a_502(ca, ca_dir):
    async def one_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Promises keep-alive (HTTP/1.1, no "Connection: close") but hangs up after each response, as servers
        # with a short idle timeout do: the gateway's pooled connection is dead when the next request comes.
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfresh")
        await writer.drain()

    async with RawUpstream(one_per_connection) as upstream, running(
            gateway_config(ca_dir, plain(upstream.port), tls=False)) as gw, aiohttp.ClientSession() as client:
        for _ in range(4):
            async with client.get(url(gw, "/", scheme="http")) as resp:
                assert resp.status == 200
                assert await resp.read() == b"fresh"
            await asyncio.sleep(0)  # let the gateway see the close, or not: both paths must answer 200


async def test_upstream_answering_an_upload_early_reaches_the_client(ca, ca_dir):
    async def reject(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)  # answers without reading the body
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\nconnection: close\r\n\r\ntoo big\n")
        await writer.drain()
        # Lingering close, as nginx does: closing with unread input would send a reset that can destroy the
        # answer before the peer reads it.
        writer.write_eof()
        async with asyncio.timeout(10):
            while await reader.read(65536):
                pass

    async def body() -> AsyncIterator[bytes]:
        for _ in range(64):
            yield os.urandom(64 * 1024)

    # drain_timeout_s is short because the edge holds a connection whose request body was never read until the
    # drain timeout (with either upstream client; reported, not fixed here).
    async with RawUpstream(reject) as upstream, running(
            gateway_config(ca_dir, plain(upstream.port), tls=False, drain_timeout_s=0.5)) as gw, \
            aiohttp.ClientSession() as client:
        try:
            async with client.post(url(gw, "/upload", scheme="http"), data=body()) as resp:
                status, text = resp.status, await resp.text()
        except aiohttp.ClientOSError:
            pytest.skip("the client's own upload write failed first; nothing to check about the gateway")
    assert status == 413, text
    assert text == "too big\n"


async def test_head_keeps_the_upstream_content_length_and_has_no_body(ca, ca_dir):
    seen: list[str] = []

    async def head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            request_line, _ = await read_head(reader)
            seen.append(request_line)
            body = b"" if request_line.startswith("HEAD") else b"0123456789"
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n" + body)
            await writer.drain()

    async with RawUpstream(head) as upstream, running(
            gateway_config(ca_dir, plain(upstream.port), tls=False)) as gw, aiohttp.ClientSession() as client:
        async with client.head(url(gw, "/h", scheme="http")) as resp:
            assert resp.status == 200
            assert resp.headers["content-length"] == "10"
            assert await resp.read() == b""
        async with client.get(url(gw, "/g", scheme="http")) as resp:  # the next request is not confused
            assert await resp.read() == b"0123456789"
    assert seen == ["HEAD /h HTTP/1.1", "GET /g HTTP/1.1"]


async def test_interim_100_continue_from_upstream_is_skipped(ca, ca_dir):
    async def continue_then_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, headers = await read_head(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        data = await reader.readexactly(int(headers["content-length"]))
        writer.write(b"HTTP/1.1 201 Created\r\ncontent-length: %d\r\n\r\n%b" % (len(data), data))
        await writer.drain()

    async with RawUpstream(continue_then_answer) as upstream, running(
            gateway_config(ca_dir, plain(upstream.port), tls=False)) as gw, aiohttp.ClientSession() as client:
        async with client.put(url(gw, "/p", scheme="http"), data=b"payload") as resp:
            assert resp.status == 201
            assert await resp.read() == b"payload"


async def test_malformed_upstream_response_is_502(ca, ca_dir):
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()

    async with RawUpstream(garbage) as upstream, running(
            gateway_config(ca_dir, plain(upstream.port), tls=False)) as gw, aiohttp.ClientSession() as client:
        async with client.get(url(gw, "/", scheme="http")) as resp:
            assert resp.status == 502
            assert (await resp.json())["error"]


@pytest.mark.parametrize("client_kind", ["h1", "aiohttp"])
async def test_both_clients_give_the_same_answers_over_mtls(ca, ca_dir, web_upstream: RunningUpstream,
                                                            client_creds, client_kind):
    catalog = {"web": [{"address": web_upstream.host, "port": web_upstream.port, "spiffe_id": WEB_ID}]}
    config = gateway_config(ca_dir, catalog, upstream={"client": client_kind})
    payload = os.urandom(300_000)
    async with running(config) as gw, aiohttp.ClientSession() as client:
        ssl_context = client_ssl(ca.bundle_pem, client_creds)
        async with client.get(url(gw, "/report"), ssl=ssl_context) as resp:
            assert resp.status == 200
            assert json.loads(await resp.read())["path"] == "/report"
        async with client.post(url(gw, "/echo"), data=payload, ssl=ssl_context) as resp:
            assert resp.status == 200
            assert await resp.read() == payload
        async with client.get(url(gw, "/bytes/1000000"), ssl=ssl_context) as resp:
            assert len(await resp.read()) == 1_000_000
