"""A small HTTP service that requires mTLS from the mesh and reports what it received.

`GET` answers JSON describing the request (method, path, headers, caller's SPIFFE ID); POST, PUT and PATCH get
the body echoed back, streamed. `/bytes/<n>` streams n bytes; `/slow?seconds=s` waits (at most 60 s) first.
"""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass

from aiohttp import web

from mesh_gateway.identity.tls import peer_spiffe_id, server_context
from mesh_gateway.model import Credentials

MAX_BYTES = 64 * 1024 * 1024


@dataclass
class RunningUpstream:
    runner: web.BaseRunner
    host: str
    port: int

    async def close(self) -> None:
        await self.runner.cleanup()


def make_app(name: str) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        transport = request.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport else None
        caller = peer_spiffe_id(ssl_object)
        if request.path.startswith("/slow"):
            await asyncio.sleep(min(float(request.query.get("seconds", "1")), 60.0))
        if request.path.startswith("/bytes/"):
            count = min(int(request.path.rsplit("/", 1)[1] or 0), MAX_BYTES)
            response = web.StreamResponse(headers={"content-type": "application/octet-stream"})
            response.content_length = count
            await response.prepare(request)
            block = b"x" * 65536
            while count > 0:
                await response.write(block[: min(count, len(block))])
                count -= min(count, len(block))
            await response.write_eof()
            return response
        if request.method in ("POST", "PUT", "PATCH"):
            response = web.StreamResponse(headers={"content-type": request.content_type,
                                                   "x-upstream": name})
            await response.prepare(request)
            async for chunk in request.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
        report = {
            "service": name,
            "method": request.method,
            "path": request.raw_path,
            "caller": str(caller) if caller else None,
            "headers": {k.lower(): v for k, v in request.headers.items()},
        }
        return web.Response(text=json.dumps(report), content_type="application/json",
                            headers={"x-upstream": name})

    app = web.Application(client_max_size=MAX_BYTES)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def start_upstream(name: str, credentials: Credentials, *, host: str = "127.0.0.1", port: int = 0,
                         client_auth: str = "required") -> RunningUpstream:
    context = server_context(credentials.cert_chain_pem, credentials.key_pem,
                             client_auth=client_auth,  # type: ignore[arg-type]
                             client_ca_pem=credentials.bundle_pem)
    runner = web.AppRunner(make_app(name), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(512)
    sock.setblocking(False)
    await web.SockSite(runner, sock, ssl_context=context).start()
    return RunningUpstream(runner, host, sock.getsockname()[1])
