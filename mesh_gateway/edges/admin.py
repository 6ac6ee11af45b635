"""The admin listener: health, readiness and the views other features register. Bound to loopback by default."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

ReadinessCheck = Callable[[], str | None]
"""Returns None when ready, or the reason it is not."""
View = Callable[[], Any]


class Admin:
    def __init__(self) -> None:
        self.readiness: list[ReadinessCheck] = []
        self.app = web.Application()
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/readyz", self._readyz)

    def add_json_view(self, path: str, view: View) -> None:
        async def handler(_: web.Request) -> web.Response:
            return web.json_response(view(), dumps=_dumps)

        self.app.router.add_get(path, handler)

    def add_handler(self, path: str, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> None:
        self.app.router.add_get(path, handler)

    def not_ready_reasons(self) -> list[str]:
        return [reason for check in self.readiness if (reason := check()) is not None]

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, _: web.Request) -> web.Response:
        reasons = self.not_ready_reasons()
        if reasons:
            return web.json_response({"status": "not ready", "reasons": reasons}, status=503)
        return web.json_response({"status": "ready"})


def _dumps(value: Any) -> str:
    import json

    return json.dumps(value, indent=2, default=str)
