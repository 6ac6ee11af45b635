"""Measurement aid, not product code: three minimal TLS → mTLS proxies that differ only in the HTTP machinery.

Used with `bench/run.py --gateway-cmd` to answer "would a uvloop Protocol + httptools edge beat aiohttp's server by
enough to matter?" with numbers (docs/performance.md). Each does the same job as the gateway's data path minus
routing/authz/tracing: TLS listener, keep-alive mTLS pool to the upstream, hop-by-hop stripping, upstream URI SAN
checked once per connection.

    aiohttp   aiohttp.web server + aiohttp.ClientSession upstream (the gateway's current stack)
    aiohttp-raw  aiohttp.web server + the httptools upstream pool below
    h-client  httptools/asyncio.Protocol edge + aiohttp.ClientSession upstream
    raw       httptools/asyncio.Protocol edge + httptools/asyncio.Protocol upstream pool
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
from collections import deque
from pathlib import Path

import httptools
import uvloop
from aiohttp import ClientSession, TCPConnector, web

HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
       b"host", b"content-length"}
UPSTREAM_ID = "URI:spiffe://bench.local/upstream"


def contexts(root: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(root / "edge.pem", root / "edge.key")
    server.load_verify_locations(root / "ca" / "bundle.pem")
    server.verify_mode = ssl.CERT_OPTIONAL
    server.num_tickets = 0
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_cert_chain(root / "nginx-proxy.pem", root / "nginx-proxy.key")
    client.load_verify_locations(root / "ca" / "bundle.pem")
    client.check_hostname = False  # the SPIFFE URI SAN is checked instead
    return server, client


def check_peer(sslobj: ssl.SSLObject | ssl.SSLSocket | None) -> None:
    cert = sslobj.getpeercert() if sslobj else None
    sans = [f"{k}:{v}" for k, v in (cert or {}).get("subjectAltName", ())]
    if UPSTREAM_ID not in sans:
        raise ConnectionError("upstream SPIFFE ID mismatch")


class UpstreamConn(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[tuple[int, list[tuple[bytes, bytes]], bytes]] | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's SSL transport is no asyncio.Transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("upstream closed"))

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.headers, self.body = [], []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if not self.parser.should_keep_alive():
            self.closed = True
        if self.waiter and not self.waiter.done():
            self.waiter.set_result((self.parser.get_status_code(), self.headers, b"".join(self.body)))


class RawPool:
    def __init__(self, port: int, ctx: ssl.SSLContext) -> None:
        self.port, self.ctx = port, ctx
        self.idle: deque[UpstreamConn] = deque()

    async def request(self, head: bytes, body: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                break
        else:
            loop = asyncio.get_running_loop()
            _, conn = await loop.create_connection(UpstreamConn, "127.0.0.1", self.port, ssl=self.ctx,
                                                   server_hostname="localhost")
            assert conn.transport
            check_peer(conn.transport.get_extra_info("ssl_object"))
        assert conn.transport
        conn.waiter = asyncio.get_running_loop().create_future()
        conn.transport.write(head + body)
        result = await conn.waiter
        if not conn.closed:
            self.idle.append(conn)
        else:
            conn.transport.close()
        return result


class Edge(asyncio.Protocol):
    def __init__(self, forward: object) -> None:
        self.forward = forward
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.queue: deque[tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes, bool]] = deque()
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's SSL transport is no asyncio.Transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url, self.headers, self.body = b"", [], []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.queue.append((self.parser.get_method(), self.url, self.headers, b"".join(self.body),
                           self.parser.should_keep_alive()))
        if not self.busy:
            self.busy = True
            asyncio.get_running_loop().create_task(self.drain())

    async def drain(self) -> None:
        assert self.transport
        while self.queue:
            method, url, headers, body, keep = self.queue.popleft()
            try:
                status, rheaders, rbody = await self.forward(method, url, headers, body)  # type: ignore[operator]
            except Exception:
                status, rheaders, rbody = 502, [], b"bad gateway\n"
            out = [b"HTTP/1.1 %d OK\r\n" % status]
            out += [n + b": " + v + b"\r\n" for n, v in rheaders if n.lower() not in HOP]
            out.append(b"content-length: %d\r\n\r\n" % len(rbody))
            self.transport.write(b"".join(out) + rbody)
            if not keep:
                self.transport.close()
                break
        self.busy = False


def upstream_head(method: bytes, url: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    lines = [method + b" " + url + b" HTTP/1.1\r\nhost: localhost\r\n"]
    lines += [n + b": " + v + b"\r\n" for n, v in headers if n.lower() not in HOP]
    lines.append(b"content-length: %d\r\n\r\n" % len(body) if body else b"\r\n")
    return b"".join(lines)


async def main(args: argparse.Namespace) -> None:
    server_ctx, client_ctx = contexts(Path(args.root))
    loop = asyncio.get_running_loop()
    upstream = f"https://127.0.0.1:{args.upstream_port}"
    pool = RawPool(args.upstream_port, client_ctx)
    session = ClientSession(connector=TCPConnector(ssl=client_ctx, limit=256), auto_decompress=False,
                            skip_auto_headers=("User-Agent", "Accept-Encoding"))

    async def forward_raw(method: bytes, url: bytes, headers: list[tuple[bytes, bytes]],
                          body: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        return await pool.request(upstream_head(method, url, headers, body), body)

    async def forward_client(method: bytes, url: bytes, headers: list[tuple[bytes, bytes]],
                             body: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        hdrs = [(n.decode(), v.decode()) for n, v in headers if n.lower() not in HOP]
        async with session.request(method.decode(), upstream + url.decode(), headers=hdrs,
                                   data=body or None) as resp:
            return resp.status, list(resp.raw_headers), await resp.read()

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        if args.mode == "aiohttp-raw":
            raw = [(n.lower(), v) for n, v in request.raw_headers]
            status, rheaders, data = await forward_raw(request.method.encode(), request.raw_path.encode(), raw, body)
            out = [(n.decode(), v.decode()) for n, v in rheaders if n.lower() not in HOP]
            return web.Response(status=status, body=data, headers=out)
        hdrs = [(n, v) for n, v in request.headers.items() if n.lower().encode() not in HOP]
        async with session.request(request.method, upstream + request.path_qs, headers=hdrs,
                                   data=body or None) as resp:
            data = await resp.read()
            return web.Response(status=resp.status, body=data,
                                headers=[(n, v) for n, v in resp.headers.items() if n.lower().encode() not in HOP])

    if args.mode in ("raw", "h-client"):
        forward = forward_raw if args.mode == "raw" else forward_client
        server = await loop.create_server(lambda: Edge(forward), "127.0.0.1", args.port, ssl=server_ctx,
                                          backlog=1024)
        await server.serve_forever()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port, ssl_context=server_ctx, backlog=1024).start()
    await asyncio.Event().wait()  # serve until SIGTERM


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("aiohttp", "aiohttp-raw", "h-client", "raw"), required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--root", required=True)
    uvloop.run(main(parser.parse_args()))
