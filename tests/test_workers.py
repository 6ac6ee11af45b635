"""`workers: N`: N processes accept on one port (SO_REUSEPORT), drain together on SIGTERM, and stop as a set."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml

from mesh_gateway import config as cfg
from tests.support import GATEWAY_ID, WEB_ID, reap
from tests.test_lifecycle import (
    refuses_connections,
    sigterm_during_a_slow_request,
    start_slow_upstream,
    wait_for_serving,
)

BASE = {
    "trust_domain": "mesh.local",
    "listeners": [{"name": "public", "address": "127.0.0.1:0"}],
    "identity": {"ca_dir": "ca", "spiffe_id": GATEWAY_ID},
}


@pytest.mark.parametrize(("workers", "address", "error"), [
    (0, "127.0.0.1:8443", "workers: must be between 1 and 64, or 'auto'"),
    (65, "127.0.0.1:8443", "workers: must be between 1 and 64, or 'auto'"),
    ("many", "127.0.0.1:8443", "workers"),
    (2, "127.0.0.1:0", "listeners[0].address: needs a fixed port when workers is not 1"),
    ("auto", "127.0.0.1:0", "listeners[0].address: needs a fixed port when workers is not 1"),
])
def test_invalid_worker_settings_name_the_key(workers: object, address: str, error: str) -> None:
    data = {**BASE, "workers": workers, "listeners": [{"name": "public", "address": address}]}
    with pytest.raises(cfg.ConfigError) as caught:
        cfg.parse(data)
    assert any(line.startswith(error) for line in caught.value.errors), caught.value.errors


def test_auto_and_one_worker_with_port_0_are_accepted() -> None:
    assert cfg.parse({**BASE, "workers": "auto", "listeners": [{"name": "p", "address": "127.0.0.1:8443"}]}
                     ).workers == "auto"
    assert cfg.parse(BASE).workers == 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def listening_pids(port: int) -> set[int]:
    """Processes holding a LISTEN socket on 127.0.0.1:port, found the way `ss -ltnp` does (via /proc)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
            inodes.add(f"socket:[{fields[9]}]")
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{entry}/fd"):
                if os.readlink(f"/proc/{entry}/fd/{fd}") in inodes:
                    pids.add(int(entry))
        except OSError:
            continue
    return pids


async def start_gateway(tmp_path: Path, ca_dir: Path, upstream_port: int,
                        port: int) -> asyncio.subprocess.Process:
    config = {
        "trust_domain": "mesh.local",
        "listeners": [{"name": "public", "address": f"127.0.0.1:{port}", "tls": {"client_auth": "optional"}}],
        "identity": {"ca_dir": str(ca_dir), "spiffe_id": GATEWAY_ID, "dns": ["localhost", "127.0.0.1"]},
        "catalog": {"static": {"web": [{"address": "127.0.0.1", "port": upstream_port, "spiffe_id": WEB_ID}]}},
        "routes": [{"name": "web", "match": {"path_prefix": "/"}, "service": "web"}],
        "admin": {"address": "127.0.0.1:0"},
        "drain_timeout_s": 10,
        "workers": 2,
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh_gateway", "run", "-c", str(path), stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path.cwd())})


async def both_workers_listening(process: asyncio.subprocess.Process, port: int) -> set[int]:
    async with asyncio.timeout(30):
        while len(pids := listening_pids(port)) < 2:
            assert process.returncode is None, "gateway exited during start-up"
            await asyncio.sleep(0.05)
    return pids


async def test_two_workers_share_the_port_and_drain_in_flight_requests_on_sigterm(ca, ca_dir, tmp_path):
    arrived, release = asyncio.Event(), asyncio.Event()
    runner, upstream_port = await start_slow_upstream(ca, arrived, release)
    port = free_port()
    process = await start_gateway(tmp_path, ca_dir, upstream_port, port)
    try:
        _, admin_port = await wait_for_serving(process)
        pids = await both_workers_listening(process, port)
        assert process.pid not in pids  # the parent only supervises
        assert len(pids) == 2
        async with aiohttp.ClientSession() as client:
            async with client.get(f"http://127.0.0.1:{admin_port}/readyz") as ready:
                assert ready.status == 200
            await sigterm_during_a_slow_request(client, ca, process, port, arrived, release)
        assert await asyncio.wait_for(process.wait(), 20) == 0
        assert listening_pids(port) == set()
    finally:
        await reap(process)
        await runner.cleanup()


async def test_a_worker_that_dies_stops_the_set_with_an_error(ca, ca_dir, tmp_path):
    arrived, release = asyncio.Event(), asyncio.Event()
    runner, upstream_port = await start_slow_upstream(ca, arrived, release)
    port = free_port()
    process = await start_gateway(tmp_path, ca_dir, upstream_port, port)
    try:
        await wait_for_serving(process)
        victim, survivor = sorted(await both_workers_listening(process, port))
        os.kill(victim, signal.SIGKILL)
        assert await asyncio.wait_for(process.wait(), 30) == 1
        assert process.stderr is not None
        log = await process.stderr.read()
        assert f"(pid {victim}) exited with status -9".encode() in log
        assert not os.path.exists(f"/proc/{survivor}") or listening_pids(port) == set()
        assert refuses_connections(port)
    finally:
        await reap(process)
        await runner.cleanup()
