"""TLS origination for gRPC channels, so the upstream's SPIFFE ID is checked on the very connection calls use.

grpcio's client TLS can verify a certificate chain and a host name, but it cannot check a URI SAN, and the Python
client API exposes no auth context for a call (`ServicerContext.auth_context()` exists on the server side only).
Checking the SPIFFE ID on a second, separate connection would be a check of a different connection. So a channel
to an mTLS endpoint speaks plaintext HTTP/2 to a private unix socket (in a 0700 directory: only this user can
dial it), and every connection accepted there is carried to the endpoint over a fresh TLS connection made by the
ssl module with the gateway's SVID; the peer's URI SAN is compared with the expected SPIFFE ID right after the
handshake, and only then is a byte from grpc passed on. A mismatch closes the local connection: grpc sees a failed
connect, the channel goes to TRANSIENT_FAILURE, and nothing of the call ever reaches the impostor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl

from mesh_gateway.errors import GatewayError, UpstreamIdentityMismatch, UpstreamUnavailable
from mesh_gateway.identity.tls import UpstreamContext, verify_peer
from mesh_gateway.model import Endpoint
from mesh_gateway.spiffe import IdentityError

log = logging.getLogger("mesh_gateway.upstream.grpc")

CHUNK = 64 * 1024


class TlsBridge:
    def __init__(self, endpoint: Endpoint, context: UpstreamContext, path: str, *, connect_timeout_s: float) -> None:
        self.endpoint = endpoint
        self.path = path
        self._context = context
        self._connect_timeout_s = connect_timeout_s
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.last_error: GatewayError | None = None
        """Why the last connection attempt failed; the forwarder reports it when the channel cannot connect."""
        self.breaks = 0
        """Bridged connections that have ended. A call that fails while this moves was cut by the transport."""

    @property
    def target(self) -> str:
        return f"unix:{self.path}"

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._accept, path=self.path, limit=CHUNK)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _accept(self, local_reader: asyncio.StreamReader, local_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._carry(local_reader, local_writer)
        except asyncio.CancelledError:
            pass  # bridge closing; the finally below drops the connection
        finally:
            self._tasks.discard(task)
            self.breaks += 1
            local_writer.close()

    async def _carry(self, local_reader: asyncio.StreamReader, local_writer: asyncio.StreamWriter) -> None:
        endpoint = self.endpoint
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                remote_reader, remote_writer = await asyncio.open_connection(
                    endpoint.address, endpoint.port, ssl=self._context, server_hostname=endpoint.address,
                    limit=CHUNK)
        except TimeoutError:
            self.last_error = UpstreamUnavailable(f"{endpoint.key}: connect timed out")
            return
        except ssl.SSLError as exc:
            self.last_error = UpstreamUnavailable(f"{endpoint.key}: TLS handshake failed: {exc.reason}")
            return
        except OSError as exc:
            self.last_error = UpstreamUnavailable(f"{endpoint.key}: {exc.strerror or exc}")
            return
        try:
            expected = self._context.expected_spiffe_id
            if expected is not None:
                try:
                    verify_peer(remote_writer.get_extra_info("ssl_object"), expected)
                except IdentityError as exc:
                    self.last_error = UpstreamIdentityMismatch(f"{endpoint.key}: {exc}")
                    log.warning("refusing gRPC upstream %s: %s", endpoint.key, exc)
                    return
            self.last_error = None
            # Both directions at once; when either side finishes, the other is closed with it.
            up = asyncio.ensure_future(_pump(local_reader, remote_writer))
            down = asyncio.ensure_future(_pump(remote_reader, local_writer))
            try:
                await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                up.cancel()
                down.cancel()
                await asyncio.wait({up, down}, timeout=1.0)
        finally:
            remote_writer.close()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, ssl.SSLError):
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
