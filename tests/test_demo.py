"""`make run` as a newcomer meets it: the printed curl lines, run with the real curl against the running demo."""

from __future__ import annotations

import asyncio
import json
import shlex
import shutil

import pytest

from mesh_gateway.app import Gateway
from mesh_gateway.commands.demo import demo_config, demo_mesh, ensure_client_cert, instructions

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="needs the curl binary")


async def curl(line: str) -> tuple[int, dict[str, object]]:
    argv = [*shlex.split(line), "-s", "-w", "\n%{http_code}"]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    async with asyncio.timeout(30):
        out, _ = await proc.communicate()
    body, _, status = out.decode().rpartition("\n")
    return int(status), json.loads(body)


async def test_the_printed_curl_lines_do_what_they_say(ca, ca_dir):
    cert, key = ensure_client_cert(ca_dir)
    async with demo_mesh(ca_dir, upstream_port=0, mesh_base_port=0) as (upstream, mesh):
        gateway = Gateway(demo_config(ca_dir, "127.0.0.1:0", upstream.port, "127.0.0.1:0", mesh))
        await gateway.start()
        try:
            text = instructions(gateway, mesh, ca_dir, cert, key)
            lines = [line.strip() for line in text.splitlines() if line.strip().startswith("curl ")]
            assert [line.rsplit("/", 1)[1] for line in lines] == ["hello", "apple", "items"]
            hello, order, items = [await curl(line) for line in lines]
        finally:
            await gateway.stop()
    assert hello[0] == 200 and hello[1]["service"] == "web"
    assert order[0] == 200
    assert order[1]["inventory"]["caller"] == "spiffe://mesh.local/ns/default/sa/orders"
    assert order[1]["caller"] == "spiffe://mesh.local/ns/default/sa/gateway"
    assert items == (403, {"error": "forbidden", "request_id": items[1]["request_id"]})
