"""The access log: one JSON object per request, per line, to stdout or a file.

Lines are buffered in memory and written when the buffer fills or every `flush_interval_s` (`run()`), so a busy
gateway makes one write per batch, not per request. The writes are small appends to the page cache, which is why
they happen on the event loop rather than on a thread.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any, TextIO

from mesh_gateway.config import AccessLog as AccessLogConfig
from mesh_gateway.config import ConfigError

if TYPE_CHECKING:
    from mesh_gateway.pipeline import Exchange

log = logging.getLogger("mesh_gateway.access_log")


def access_record(exchange: Exchange, duration_s: float, *, now: float, include_query: bool) -> dict[str, Any]:
    info = exchange.info
    span = exchange.span
    stamp = dt.datetime.fromtimestamp(now, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    record: dict[str, Any] = {
        "time": stamp,
        "request_id": info.request_id,
        "trace_id": span.trace_id or None,
        "span_id": span.span_id or None,
        "listener": info.listener,
        "client": info.client_address,
        "peer": str(info.peer_spiffe_id) if info.peer_spiffe_id else None,
        "method": info.method,
        "host": info.host,
        "path": info.path,
        "protocol": info.protocol,
        "route": exchange.route.name if exchange.route else None,
        "upstream": exchange.endpoint.key if exchange.endpoint else None,
        "status": exchange.status,
        "bytes_in": exchange.bytes_in,
        "bytes_out": exchange.bytes_out,
        "duration_ms": round(duration_s * 1000, 3),
        "decision_id": (exchange.decision.decision_id or None) if exchange.decision else None,
        "error": exchange.error.kind if exchange.error else None,
    }
    if include_query:
        record["query"] = info.query
    return record


class LineBuffer:
    """Lines collected in memory and written in batches: when `buffer_bytes` fill, every `flush_interval_s`
    (`run()`), and on close. A request never waits on a log write it could not batch; a failed write loses the
    batch (counted, logged), never the request."""

    def __init__(self, out: IO[str], *, name: str, buffer_bytes: int = 64 * 1024,
                 flush_interval_s: float = 0.2) -> None:
        self._out = out
        self._name = name
        self._buffer_bytes = buffer_bytes
        self._flush_interval_s = flush_interval_s
        self._pending: list[str] = []
        self._pending_bytes = 0
        self.lost = 0

    def add(self, line: str) -> None:
        self._pending.append(line + "\n")
        self._pending_bytes += len(line) + 1
        if self._pending_bytes >= self._buffer_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        lines, self._pending, self._pending_bytes = self._pending, [], 0
        try:
            self._out.write("".join(lines))
            self._out.flush()
        except (OSError, ValueError) as exc:  # disk full or stream closed: lose the batch, keep serving
            self.lost += len(lines)
            log.error("%s write failed, %d lines lost: %s", self._name, len(lines), exc)

    async def run(self) -> None:
        """Flush every `flush_interval_s` until cancelled; flushes once more on the way out."""
        try:
            while True:
                await asyncio.sleep(self._flush_interval_s)
                self.flush()
        finally:
            self.flush()


class AccessLog:
    def __init__(self, config: AccessLogConfig, *, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._clock = clock
        self._owned: TextIO | None = None
        if stream is None and config.path != "-":
            try:
                fd = os.open(config.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            except OSError as exc:
                raise ConfigError([f"telemetry.access_log.path: cannot open {config.path}: {exc.strerror}"]) from None
            stream = self._owned = open(fd, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._lines = LineBuffer(stream if stream is not None else sys.stdout, name="access log",
                                 buffer_bytes=config.buffer_bytes, flush_interval_s=config.flush_interval_s)

    def record(self, exchange: Exchange, duration_s: float) -> None:
        line = json.dumps(access_record(exchange, duration_s, now=self._clock(),
                                        include_query=self._config.include_query),
                          separators=(",", ":"), ensure_ascii=True)
        self._lines.add(line)

    def flush(self) -> None:
        self._lines.flush()

    async def run(self) -> None:
        await self._lines.run()

    def close(self) -> None:
        self.flush()
        if self._owned is not None:
            self._owned.close()
            self._owned = None
