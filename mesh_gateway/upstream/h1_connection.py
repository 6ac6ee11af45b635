"""One upstream HTTP/1.1 connection for upstream/h1.py: an asyncio Protocol around httptools' response parser.

It carries one exchange at a time: the request is written by the forwarder, the response head resolves `head`, body
chunks queue up (reading pauses above HIGH_WATER buffered bytes) until the forwarder's body stream takes them.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

import httptools

from mesh_gateway.errors import UpstreamTimeout, UpstreamUnavailable

HIGH_WATER = 256 * 1024  # buffered response bytes before reading from the upstream pauses
_MAX_HEAD_BYTES = 64 * 1024


class StaleConnection(Exception):
    """A reused connection died before any response byte: safe to retry a replayable request."""


class UpstreamConnection(asyncio.Protocol):
    """One upstream connection; carries one exchange at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_open_change: Callable[[int], None] | None = None) -> None:
        self.loop = loop
        self._on_open_change = on_open_change
        self.transport: Any = None  # uvloop's SSL transport is not an asyncio.Transport subclass
        self.parser = httptools.HttpResponseParser(self)
        self.reusable = True
        self.closed = False
        self.idle_since = 0.0
        self._reset()
        self._can_write = asyncio.Event()
        self._can_write.set()

    def _reset(self) -> None:
        self.head: asyncio.Future[None] = self.loop.create_future()
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.head_bytes = 0
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.complete = False
        self.error: Exception | None = None
        self.got_bytes = False
        self.active = False
        self.sender: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Future[None] | None = None

    def begin(self) -> None:
        self._reset()
        self.active = True

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if self._on_open_change is not None:
            self._on_open_change(1)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._on_open_change is not None and not self.closed:
            self._on_open_change(-1)
        self.closed = True
        self.reusable = False
        self._can_write.set()
        if self.active and not self.complete:  # an idle pooled connection closing is not an error
            self._fail(StaleConnection() if not self.got_bytes else
                       UpstreamUnavailable("upstream closed the connection mid-response"))

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamUnavailable("upstream switched protocols, which is not supported"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamUnavailable(f"malformed response from upstream: {exc}"))
        if self.buffered > HIGH_WATER and not self.closed:
            self.transport.pause_reading()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > _MAX_HEAD_BYTES:
            raise UpstreamUnavailable("upstream response head too large")
        self.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # interim (100 Continue): llhttp completes it as a message of its own
            self.headers, self.head_bytes = [], 0
            return
        self.status = status
        if not self.parser.should_keep_alive():
            self.reusable = False
        if not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        self._wake()

    def on_message_complete(self) -> None:
        if self.status == 0:  # end of an interim response
            return
        self.complete = True
        self._wake()

    def _fail(self, error: Exception) -> None:
        self.reusable = False
        if self.error is None:
            self.error = error
        if not self.head.done():
            self.head.set_exception(error)
            self.head.exception()  # whoever awaits it still gets the error; nobody waiting is not a bug
        self._wake()

    def wakeup(self) -> asyncio.Future[None]:
        """A future resolved by the next body bytes, the end of the response or a failure."""
        self._wakeup = self.loop.create_future()
        return self._wakeup

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    # used by the forwarder
    async def write(self, data: bytes) -> None:
        if self.closed:
            raise StaleConnection() if not self.got_bytes else UpstreamUnavailable("upstream connection closed")
        self.transport.write(data)
        if not self._can_write.is_set():
            await self._can_write.wait()

    async def next_chunk(self, idle_timeout_s: float) -> bytes | None:
        """The next body chunk, None at the end of the response."""
        while not self.chunks:
            if self.complete:
                return None
            if self.error is not None:
                raise self.error
            wakeup = self.wakeup()
            try:
                async with asyncio.timeout(idle_timeout_s):
                    await wakeup
            except TimeoutError:
                raise UpstreamTimeout("upstream went idle mid-body") from None
        chunk = self.chunks.popleft()
        self.buffered -= len(chunk)
        if self.buffered <= HIGH_WATER // 2 and not self.closed:
            self.transport.resume_reading()
        return chunk

    def close(self) -> None:
        self.reusable = False
        if self.sender is not None and not self.sender.done():
            self.sender.cancel()
        if not self.closed and self.transport is not None:
            self.transport.close()
        self.closed = True
