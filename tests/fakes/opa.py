"""A fake OPA server: a real aiohttp server speaking OPA's Data API and evaluating real Rego with regorus.

`POST /v1/data/<path>` with `{"input": ...}` answers like OPA: `{"result": <value>, "decision_id": "<uuid>"}`, or
no `result` key when the rule is undefined; evaluation errors answer 500 with OPA's error shape. Knobs let tests
make it slow (`delay_s`) or broken (`status`). Its regorus engine is created and used on the test's loop thread.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from mesh_gateway.authz.policyset import read
from mesh_gateway.authz.rego import compile_source, short_error


def _jsonable(value: Any) -> Any:
    if isinstance(value, set | frozenset):
        return sorted(value, key=json.dumps)  # OPA serialises sets as arrays
    raise TypeError(type(value).__name__)


@dataclass
class FakeOpa:
    policies: Path
    rego_v0: bool = False
    delay_s: float = 0.0
    status: int = 200
    requests: list[dict[str, Any]] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 0
    tls: ssl.SSLContext | None = None
    _runner: web.AppRunner | None = None
    _engine: Any = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    async def start(self) -> FakeOpa:
        self._engine = compile_source(read(self.policies), rego_v0=self.rego_v0)
        app = web.Application()
        app.router.add_post("/v1/data/{path:.*}", self._data)
        app.router.add_get("/health", self._health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        sock.setblocking(False)
        site = web.SockSite(self._runner, sock, ssl_context=self.tls)
        await site.start()
        self.host, self.port = sock.getsockname()[:2]
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _health(self, _: web.Request) -> web.Response:
        return web.json_response({})

    async def _data(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.status != 200:
            return web.json_response({"code": "internal_error", "message": "configured failure"}, status=self.status)
        rule = "data." + ".".join(p for p in request.match_info["path"].split("/") if p)
        self._engine.set_input(body.get("input"))
        try:
            value = self._engine.eval_rule(rule)
        except RuntimeError as exc:
            if "not a valid rule path" in str(exc):
                value = None  # OPA answers an undefined document, not an error, for a path nothing defines
            else:
                return web.json_response({"code": "internal_error", "message": short_error(exc)}, status=500)
        answer: dict[str, Any] = {"decision_id": str(uuid.uuid4())}
        if value is not None:
            answer["result"] = value
        return web.json_response(answer, dumps=lambda v: json.dumps(v, default=_jsonable))
