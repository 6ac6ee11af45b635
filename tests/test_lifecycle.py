"""The gateway as a process: readiness, and SIGTERM draining in-flight requests before a clean exit."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web

from mesh_gateway.identity.tls import server_context
from tests.support import CLIENT_ID, GATEWAY_ID, WEB_ID, client_ssl, issue, reap

SERVING = re.compile(rb"serving: public=([\d.]+):(\d+), admin=([\d.]+):(\d+)")


async def start_slow_upstream(ca, arrived: asyncio.Event, release: asyncio.Event) -> tuple[web.AppRunner, int]:
    async def slow(_: web.Request) -> web.Response:
        arrived.set()
        await asyncio.wait_for(release.wait(), 20)
        return web.Response(text="finished")

    app = web.Application()
    app.router.add_get("/{tail:.*}", slow)
    creds = issue(ca, WEB_ID)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context(
        creds.cert_chain_pem, creds.key_pem, client_auth="required", client_ca_pem=creds.bundle_pem))
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


def write_config(tmp_path: Path, ca_dir: Path, upstream_port: int) -> Path:
    config = {
        "trust_domain": "mesh.local",
        "listeners": [{"name": "public", "address": "127.0.0.1:0", "tls": {"client_auth": "optional"}}],
        "identity": {"ca_dir": str(ca_dir), "spiffe_id": GATEWAY_ID, "dns": ["localhost", "127.0.0.1"]},
        "catalog": {"static": {"web": [{"address": "127.0.0.1", "port": upstream_port, "spiffe_id": WEB_ID}]}},
        "routes": [{"name": "web", "match": {"path_prefix": "/"}, "service": "web"}],
        "admin": {"address": "127.0.0.1:0"},
        "drain_timeout_s": 10,
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def wait_for_serving(process: asyncio.subprocess.Process) -> tuple[int, int]:
    assert process.stderr is not None
    async with asyncio.timeout(30):
        while line := await process.stderr.readline():
            found = SERVING.search(line)
            if found:
                return int(found.group(2)), int(found.group(4))
    raise AssertionError("gateway exited before serving")


async def sigterm_during_a_slow_request(client: aiohttp.ClientSession, ca, process: asyncio.subprocess.Process,
                                        port: int, arrived: asyncio.Event, release: asyncio.Event) -> None:
    """SIGTERM while a request is in flight: new connections are refused, and the request still completes."""
    in_flight = asyncio.create_task(client.get(
        f"https://127.0.0.1:{port}/slow", ssl=client_ssl(ca.bundle_pem, issue(ca, CLIENT_ID))))
    await asyncio.wait_for(arrived.wait(), 10)
    process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(10):
        while not refuses_connections(port):
            await asyncio.sleep(0.05)
    release.set()
    response = await asyncio.wait_for(in_flight, 10)
    assert response.status == 200
    assert await response.text() == "finished"
    response.release()


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


async def test_sigterm_finishes_in_flight_request_refuses_new_and_exits_0(ca, ca_dir, tmp_path):
    arrived, release = asyncio.Event(), asyncio.Event()
    runner, upstream_port = await start_slow_upstream(ca, arrived, release)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh_gateway", "run", "-c", str(write_config(tmp_path, ca_dir, upstream_port)),
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    try:
        port, admin_port = await wait_for_serving(process)
        async with aiohttp.ClientSession() as client:
            async with client.get(f"http://127.0.0.1:{admin_port}/readyz") as ready:
                assert ready.status == 200
            await sigterm_during_a_slow_request(client, ca, process, port, arrived, release)
        assert await asyncio.wait_for(process.wait(), 15) == 0
    finally:
        await reap(process)
        await runner.cleanup()


async def test_run_with_missing_ca_fails_with_one_clear_line(tmp_path):
    path = write_config(tmp_path, tmp_path / "no-ca", 9)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh_gateway", "run", "-c", str(path), stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 1
    assert b"cannot start: identity:" in stderr
    assert b"ca init" in stderr
    assert b"Traceback" not in stderr


async def test_a_listener_that_cannot_bind_leaves_no_other_listener_open(ca, ca_dir, tmp_path):
    from mesh_gateway.app import Gateway
    from mesh_gateway.process import StartupError
    from tests.support import gateway_config

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    taken = blocker.getsockname()[1]
    first_port = socket.socket()
    first_port.bind(("127.0.0.1", 0))
    free = first_port.getsockname()[1]
    first_port.close()
    config = gateway_config(ca_dir, {"web": [{"address": "127.0.0.1", "port": 9, "spiffe_id": WEB_ID}]},
                            listeners=[{"name": "a", "address": f"127.0.0.1:{free}"},
                                       {"name": "b", "address": f"127.0.0.1:{taken}"}])
    gateway = Gateway(config)
    try:
        with pytest.raises(StartupError, match="cannot listen on"):
            await gateway.start()
        assert refuses_connections(free)
    finally:
        blocker.close()
