"""HTTP/2 at the edge: the h2 library's state machine on an asyncio Protocol, each stream → RequestInfo + body
stream → `Pipeline.handle`, exactly like the HTTP/1.1 edge. Upstreams stay HTTP/1.1 keep-alive.

One TLS listener serves both: `AlpnSite` (edges/alpn.py) lets the handshake finish, then hands the connection to
aiohttp (ALPN `http/1.1` or none) or to `H2Protocol` (ALPN `h2`). No framing is written here; h2 does all of it,
including flow control, which we drive: request DATA is acknowledged only as the upstream consumes it, and response
DATA waits for the client's window, so neither side can make the gateway buffer more than one window per stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import cast

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from mesh_gateway.config import Http2Settings
from mesh_gateway.edges.http import NO_FACTS, HttpEdge, RequestHead, connection_facts
from mesh_gateway.errors import (
    GatewayError,
    RequestTimeout,
)
from mesh_gateway.headers import HOP_BY_HOP
from mesh_gateway.model import Response
from mesh_gateway.pipeline import Exchange
from mesh_gateway.upstream.http import BodyTooLarge

log = logging.getLogger("mesh_gateway.edge.h2")

_END = None
_GRPC_ELSEWHERE = [(":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "12"),
                   ("grpc-message", "gRPC is served on the grpc listener")]


class _StreamGone(Exception):
    """The client reset the stream or the connection went away; nothing more can be sent on it."""


class _Stream:
    __slots__ = ("body", "gone", "id", "task", "window")

    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        self.body: asyncio.Queue[tuple[bytes, int] | None] = asyncio.Queue()
        self.window = asyncio.Event()
        self.gone = False
        self.task: asyncio.Task[None] | None = None


class H2Server:
    """Owns the HTTP/2 connections of one listener, so shutdown can send GOAWAY and drain them."""

    def __init__(self, edge: HttpEdge, settings: Http2Settings) -> None:
        self.edge = edge
        self.settings = settings
        self.connections: set[H2Protocol] = set()

    def protocol(self) -> H2Protocol:
        return H2Protocol(self)

    async def shutdown(self, timeout_s: float) -> None:
        for connection in list(self.connections):
            connection.drain()
        tasks = [s.task for c in self.connections for s in c.streams.values() if s.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
        for connection in list(self.connections):
            connection.close()


class H2Protocol(asyncio.Protocol):
    def __init__(self, server: H2Server) -> None:
        self._server = server
        self._edge = server.edge
        self._limits = server.edge.limits
        config = h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        self._conn = h2.connection.H2Connection(config=config)
        self._transport: asyncio.Transport | None = None
        self.streams: dict[int, _Stream] = {}
        self._writable = asyncio.Event()
        self._writable.set()
        self._closing = False
        self._idle: asyncio.TimerHandle | None = None
        self._facts = NO_FACTS

    # -- asyncio.Protocol ------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio subclasses
        self._facts = connection_facts(transport)
        self._server.connections.add(self)
        settings = self._server.settings
        self._conn.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: settings.max_concurrent_streams,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: settings.initial_window_bytes,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: self._limits.max_header_bytes,
        })
        self._conn.initiate_connection()
        # The connection window starts at 64 KiB whatever the settings say; open it to match the streams'.
        self._conn.increment_flow_control_window(settings.initial_window_bytes)
        self._flush()
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        try:
            events = self._conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.debug("HTTP/2 protocol error from client: %s", exc)
            self._flush()
            self.close()
            return
        for event in events:
            self._dispatch(event)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()
        for stream in self.streams.values():
            self._abandon(stream)
        self._writable.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- connection management -------------------------------------------------------------------------------

    def drain(self) -> None:
        """Refuse new streams (REFUSED_STREAM: safe for the client to retry elsewhere); once those in flight are
        done, GOAWAY and close. GOAWAY is not sent first because some clients (httpcore, so httpx) fail every
        open stream on GOAWAY, even those below its last-stream-id that RFC 9113 lets finish."""
        self._closing = True
        if not self.streams:
            self.go_away()

    def go_away(self) -> None:
        self._closing = True
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._conn.close_connection()
            self._flush()
        self.close()

    def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def _flush(self) -> None:
        data = self._conn.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _arm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = asyncio.get_running_loop().call_later(self._limits.idle_timeout_s, self.go_away)

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._request(event)
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is None or stream.gone:
                # Nobody will read it; give the window back so the connection does not starve.
                self._conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            else:
                stream.body.put_nowait((event.data, event.flow_controlled_length))
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.body.put_nowait(_END)
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                self._abandon(stream)
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            for stream in self.streams.values():
                stream.window.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._closing = True
            if not self.streams:
                self.close()

    def _abandon(self, stream: _Stream) -> None:
        stream.gone = True
        stream.window.set()
        if stream.task is not None:
            stream.task.cancel()

    def _request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        if self._closing:
            self._conn.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        stream = self.streams[stream_id] = _Stream(stream_id)
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        headers = [(str(k), str(v)) for k, v in event.headers or ()]
        stream.task = asyncio.get_running_loop().create_task(
            self._serve(stream, headers, has_body=event.stream_ended is None))
        stream.task.add_done_callback(lambda _: self._done(stream_id))

    def _done(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)
        if not self.streams:
            if self._closing:
                self.go_away()
            elif self._transport is not None and not self._transport.is_closing():
                self._arm_idle()

    # -- one stream ------------------------------------------------------------------------------------------

    async def _serve(self, stream: _Stream, headers: list[tuple[str, str]], *, has_body: bool) -> None:
        pseudo = {k: v for k, v in headers if k.startswith(":")}
        fields = [(k, v) for k, v in headers if not k.startswith(":")]
        if pseudo.get(":method") == "POST" and any(
                k == "content-type" and v.startswith("application/grpc") for k, v in fields):
            # The pipeline forwards HTTP/1.1, which cannot carry trailers; say where gRPC goes instead.
            await self._send_headers(stream, _GRPC_ELSEWHERE, end_stream=True)
            return
        head = RequestHead(method=pseudo.get(":method", ""), target=pseudo.get(":path", ""), protocol="HTTP/2",
                           fields=fields, authority=pseudo.get(":authority") or None)
        exchange = self._edge.open(head, self._facts)
        body = self._body(stream, exchange) if has_body and exchange.error is None else None
        response = await self._edge.respond(exchange, body)
        await self._respond(stream, response, exchange)

    async def _body(self, stream: _Stream, exchange: Exchange) -> AsyncIterator[bytes]:
        limits = self._limits
        cap = self._edge.body_cap(exchange)
        while True:
            try:
                async with asyncio.timeout(limits.idle_timeout_s):
                    item = await stream.body.get()
            except TimeoutError:
                raise RequestTimeout("request body stalled") from None
            if item is _END:
                return
            data, flow_controlled = item
            exchange.bytes_in += len(data)
            if exchange.bytes_in > cap:
                raise BodyTooLarge()
            # Consumed: only now may the client send more (h2 batches the WINDOW_UPDATEs).
            if not stream.gone:
                self._conn.acknowledge_received_data(flow_controlled, stream.id)
                self._flush()
            yield data

    async def _respond(self, stream: _Stream, response: Response, exchange: Exchange | None) -> None:
        headers = [(":status", str(response.status))]
        # HTTP/2 field names must be lower-case (headers an authz decision adds may not be).
        headers += [(k.lower(), v) for k, v in response.headers if k.lower() not in HOP_BY_HOP and k[:1] != ":"]
        body = response.body
        sent = 0
        try:
            if isinstance(body, bytes):
                await self._send_headers(stream, headers, end_stream=not body)
                if body:
                    await self._send_data(stream, body, end_stream=True)
                sent = len(body)
            else:
                await self._send_headers(stream, headers, end_stream=False)
                async for chunk in body:
                    await self._send_data(stream, chunk, end_stream=False)
                    sent += len(chunk)
                await self._send_data(stream, b"", end_stream=True)
        except GatewayError as error:
            # Headers are gone already: reset the stream so the client cannot take a truncated body for whole.
            log.warning("response aborted: %s", error.detail or error.public_message)
            if exchange is not None:
                exchange.error = error
            self._reset(stream, h2.errors.ErrorCodes.INTERNAL_ERROR)
        except _StreamGone:
            pass
        finally:
            if not isinstance(body, bytes):
                await body.aclose()  # type: ignore[attr-defined]
        if exchange is not None:
            self._edge.finish(exchange, response.status, sent)

    def _reset(self, stream: _Stream, code: h2.errors.ErrorCodes) -> None:
        if not stream.gone:
            stream.gone = True
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._conn.reset_stream(stream.id, code)
                self._flush()

    async def _send_headers(self, stream: _Stream, headers: list[tuple[str, str]], *, end_stream: bool) -> None:
        if stream.gone:
            raise _StreamGone()
        try:
            self._conn.send_headers(stream.id, headers, end_stream=end_stream)
        except h2.exceptions.ProtocolError as exc:
            raise _StreamGone() from exc
        self._flush()
        await self._drain()

    async def _send_data(self, stream: _Stream, data: bytes, *, end_stream: bool) -> None:
        view = memoryview(data)
        while True:
            if stream.gone:
                raise _StreamGone()
            window = min(self._conn.local_flow_control_window(stream.id), self._conn.max_outbound_frame_size)
            if window <= 0 and view:
                stream.window.clear()
                try:
                    async with asyncio.timeout(self._limits.idle_timeout_s):
                        await stream.window.wait()
                except TimeoutError:
                    self._reset(stream, h2.errors.ErrorCodes.CANCEL)  # client stopped reading
                    raise _StreamGone() from None
                continue
            chunk, view = view[:window], view[window:]
            try:
                self._conn.send_data(stream.id, bytes(chunk), end_stream=end_stream and not view)
            except h2.exceptions.ProtocolError as exc:
                raise _StreamGone() from exc
            self._flush()
            await self._drain()
            if not view:
                return

    async def _drain(self) -> None:
        if not self._writable.is_set():
            try:
                async with asyncio.timeout(self._limits.idle_timeout_s):
                    await self._writable.wait()
            except TimeoutError:
                self.close()
                raise _StreamGone() from None
        if self._transport is None or self._transport.is_closing():
            raise _StreamGone()
