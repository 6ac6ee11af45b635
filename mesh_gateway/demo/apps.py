"""The two applications of the demo mesh. They know nothing about TLS: each listens on loopback plain HTTP behind
its sidecar, learns its caller from the `x-forwarded-client-cert` the sidecar sets, and (orders) calls inventory
through its sidecar's outbound listener, passing the trace context on as any instrumented app would.

- inventory: `GET /items` (all), `GET /items/<sku>` (one, 404 if unknown).
- orders: `GET /orders/<sku>` asks inventory for `<sku>` and answers with the order and what inventory said.
"""

from __future__ import annotations

import json
import re
import socket
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

STOCK = {"apple": 12, "pear": 0, "plum": 40}
# Trace context an app must carry from the request it serves to the calls it makes, for one connected trace.
PROPAGATED = ("traceparent", "tracestate", "baggage", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid",
              "x-b3-sampled", "x-request-id")
_XFCC_URI = re.compile(r"(?:^|;)URI=([^;,]+)")


def caller_of(request: web.Request) -> str | None:
    """The caller's SPIFFE ID as vouched for by the sidecar (it strips any client-supplied value)."""
    found = _XFCC_URI.search(request.headers.get("x-forwarded-client-cert", ""))
    return found.group(1) if found else None


def _json(data: Any, status: int = 200, service: str = "") -> web.Response:
    return web.Response(text=json.dumps(data), status=status, content_type="application/json",
                        headers={"x-served-by": service})


def inventory_app() -> web.Application:
    async def all_items(request: web.Request) -> web.Response:
        return _json({"items": STOCK, "caller": caller_of(request)}, service="inventory")

    async def one_item(request: web.Request) -> web.Response:
        sku = request.match_info["sku"]
        if sku not in STOCK:
            return _json({"error": f"unknown item {sku!r}"}, 404, service="inventory")
        return _json({"sku": sku, "in_stock": STOCK[sku], "caller": caller_of(request),
                      "traceparent": request.headers.get("traceparent")}, service="inventory")

    app = web.Application()
    app.router.add_get("/items", all_items)
    app.router.add_get("/items/{sku}", one_item)
    return app


def orders_app(inventory_url: str, timeout_s: float = 10.0) -> web.Application:
    base = inventory_url.rstrip("/")
    session_key = web.AppKey("session", aiohttp.ClientSession)

    async def open_session(app: web.Application) -> None:
        app[session_key] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s))

    async def close_session(app: web.Application) -> None:
        await app[session_key].close()

    async def order(request: web.Request) -> web.Response:
        sku = request.match_info["sku"]
        headers = {name: request.headers[name] for name in PROPAGATED if name in request.headers}
        try:
            async with request.app[session_key].get(f"{base}/items/{sku}", headers=headers) as answer:
                status = answer.status
                body = await answer.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return _json({"error": f"inventory unreachable: {type(exc).__name__}"}, 502, service="orders")
        if status != 200:
            return _json({"error": "inventory refused", "inventory_status": status, "inventory": body}, 502,
                         service="orders")
        return _json({"order": sku, "accepted": body.get("in_stock", 0) > 0, "inventory": body,
                      "caller": caller_of(request)}, service="orders")

    app = web.Application()
    app.on_startup.append(open_session)
    app.on_cleanup.append(close_session)
    app.router.add_get("/orders/{sku}", order)
    return app


@dataclass
class RunningApp:
    runner: web.BaseRunner
    host: str
    port: int

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_app(app: web.Application, sock: socket.socket) -> RunningApp:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    host, port = sock.getsockname()[:2]
    return RunningApp(runner, host, port)
