"""The process around a service: binding sockets, serving aiohttp runners, signals, logging, the event loop, and
the parts every composition root builds the same way (identity source, access log, tracer).

Shared by the gateway (app.py), the sidecar (sidecar.py) and the demo.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import ssl
import uuid
from collections.abc import Callable
from typing import Protocol

from aiohttp import web

from mesh_gateway import __version__
from mesh_gateway import config as cfg
from mesh_gateway.edges.admin import Admin
from mesh_gateway.edges.http import HttpEdge
from mesh_gateway.edges.listener import HttpListener
from mesh_gateway.identity.provider import IdentitySource, IdentityUnavailable, build_source
from mesh_gateway.model import Credentials, SpiffeId
from mesh_gateway.supervisor import Supervisor
from mesh_gateway.telemetry.logs import AccessLog
from mesh_gateway.telemetry.metrics import Metrics
from mesh_gateway.telemetry.tracing import OtelTracer
from mesh_gateway.watch import Watch

log = logging.getLogger("mesh_gateway")


class StartupError(Exception):
    """The gateway cannot start; the message says why in one line."""


def bind(address: str, *, reuse_port: bool = False) -> socket.socket:
    host, port = cfg.split_host_port(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {address}: {exc.strerror}") from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def _serve_on(runner: web.BaseRunner, address: str, ssl_context: ssl.SSLContext | None) -> tuple[str, int]:
    await runner.setup()
    try:
        sock = bind(address)
    except StartupError:
        await runner.cleanup()
        raise
    await web.SockSite(runner, sock, ssl_context=ssl_context).start()
    host, port = sock.getsockname()[:2]
    return host, port


async def serve_edge(edge: HttpEdge, address: str, ssl_context: ssl.SSLContext | None, *,
                     drain_timeout_s: float) -> tuple[HttpListener, tuple[str, int]]:
    """Bind `address` and serve `edge` on it (HTTP/1.1); returns the listener (to clean up) and the bound address."""
    sock = bind(address)
    listener = HttpListener(edge, ssl_context=ssl_context, drain_timeout_s=drain_timeout_s)
    await listener.start(sock)
    host, port = sock.getsockname()[:2]
    return listener, (host, port)


async def serve_admin(admin: Admin, address: str) -> tuple[web.BaseRunner, tuple[str, int]]:
    runner = web.AppRunner(admin.app, access_log=None, shutdown_timeout=1.0)
    return runner, await _serve_on(runner, address, None)


class Service(Protocol):
    """What `run_until_signalled` drives: the gateway, or a sidecar (mesh_gateway/sidecar.py)."""

    supervisor: Supervisor

    @property
    def drain_timeout_s(self) -> float: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


async def run_until_signalled(gateway: Service, *, on_started: Callable[[], None] | None = None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await gateway.start()
    # Everything built at start-up (modules, config, routes, TLS contexts, the policy engine) lives as long as the
    # process: moved out of the collector's generations, full collections stop re-walking it. Measured: p99 at
    # 50 connections 50-55 ms → 22 ms (those were full-collection pauses), CPU per request unchanged.
    gc.freeze()
    if on_started is not None:
        on_started()
    failed = loop.create_task(gateway.supervisor.failed.wait())
    stopping = loop.create_task(stop.wait())
    await asyncio.wait({failed, stopping}, return_when=asyncio.FIRST_COMPLETED)
    failed.cancel()
    stopping.cancel()
    log.info("shutting down: draining for up to %ss", gateway.drain_timeout_s)
    await gateway.stop()
    if gateway.supervisor.failure:
        log.error("%s", gateway.supervisor.failure)
        return 1
    return 0


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def new_event_loop() -> asyncio.AbstractEventLoop:
    with contextlib.suppress(ImportError):
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        return loop
    return asyncio.new_event_loop()


def identity_source(identity: cfg.Identity, spiffe_id: SpiffeId, credentials: Watch[Credentials], *, ttl_s: float,
                    metrics: Metrics | None) -> IdentitySource:
    """The task that keeps `credentials` current (rotation, remote issuer or Consul CA); StartupError if unusable."""
    try:
        return build_source(identity, spiffe_id, credentials, ttl_s=ttl_s,
                            on_result=metrics.cert_rotated if metrics is not None else None)
    except IdentityUnavailable as exc:
        raise StartupError(str(exc)) from None


def access_log_and_tracer(telemetry: cfg.Telemetry, service_name: str) -> tuple[AccessLog | None, OtelTracer]:
    try:
        access_log = AccessLog(telemetry.access_log) if telemetry.access_log.enabled else None
        tracer = OtelTracer(telemetry.tracing, service_name=service_name, service_version=__version__,
                            instance_id=uuid.uuid4().hex)
    except cfg.ConfigError as exc:
        raise StartupError(str(exc)) from None
    return access_log, tracer
