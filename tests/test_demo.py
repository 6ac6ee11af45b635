"""`make run` as a newcomer meets it: the printed curl lines, run with the real curl against the running demo."""

from __future__ import annotations

import asyncio
import json
import shlex
import shutil
import socket

import pytest

from mesh_gateway.app import Gateway
from mesh_gateway.commands.demo import demo_config, demo_mesh, ensure_client_cert, instructions, resolve_otlp
from tests.fakes.otlp import OtlpReceiver


async def curl(line: str) -> tuple[int, dict[str, object]]:
    argv = [*shlex.split(line), "-s", "-w", "\n%{http_code}"]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    async with asyncio.timeout(30):
        out, _ = await proc.communicate()
    body, _, status = out.decode().rpartition("\n")
    return int(status), json.loads(body)


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs the curl binary")
async def test_the_printed_curl_lines_do_what_they_say(ca, ca_dir):
    receiver = OtlpReceiver().start()
    # What `--otlp auto` finds when a collector (Jaeger) listens: here the test's OTLP receiver.
    otlp = resolve_otlp("auto", ("127.0.0.1", receiver.port))
    assert otlp == receiver.endpoint
    cert, key = ensure_client_cert(ca_dir)
    try:
        async with demo_mesh(ca_dir, upstream_port=0, mesh_base_port=0, otlp=otlp) as (upstream, mesh):
            gateway = Gateway(demo_config(ca_dir, "127.0.0.1:0", upstream.port, "127.0.0.1:0", mesh, otlp))
            await gateway.start()
            try:
                text = instructions(gateway, mesh, ca_dir, cert, key, otlp)
                lines = [line.strip() for line in text.splitlines() if line.strip().startswith("curl ")]
                assert [line.rsplit("/", 1)[1] for line in lines] == ["hello", "apple", "items"]
                hello, order, items = [await curl(line) for line in lines]
            finally:
                await gateway.stop()
        spans = await receiver.wait_for(lambda spans: {s.resource["service.name"] for s in spans}
                                        >= {"mesh-gateway", "orders-sidecar", "inventory-sidecar"})
    finally:
        receiver.stop()
    trace = order[1]["inventory"]["traceparent"].split("-")[1]
    assert {s.resource["service.name"] for s in spans if s.trace_id == trace} == {
        "mesh-gateway", "orders-sidecar", "inventory-sidecar"}
    assert hello[0] == 200 and hello[1]["service"] == "web"
    assert order[0] == 200
    assert order[1]["inventory"]["caller"] == "spiffe://mesh.local/ns/default/sa/orders"
    assert order[1]["caller"] == "spiffe://mesh.local/ns/default/sa/gateway"
    assert items == (403, {"error": "forbidden", "request_id": items[1]["request_id"]})


def test_otlp_auto_is_off_without_a_collector():
    free = socket.socket()
    free.bind(("127.0.0.1", 0))  # bound, never listening: nothing accepts there
    try:
        assert resolve_otlp("auto", free.getsockname()) is None
    finally:
        free.close()
    assert resolve_otlp("off") is None
    assert resolve_otlp("http://collector:4317") == "http://collector:4317"
