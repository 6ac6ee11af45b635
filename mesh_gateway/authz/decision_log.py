"""One JSON line per authorization decision, to stderr or an append-only file.

Fields: decision_id, timestamp, route, principal, method, path, result (allow|deny|error), http_status,
duration_us, revision, engine, query, dry_run, trace_id, span_id, headers (with configured headers redacted),
and reason for errors. Secrets never reach the line: redacted headers keep only their name.

Lines are batched in memory (telemetry.logs.LineBuffer) and written by `run()` every `flush_interval_s` or when the
buffer fills: a decision never waits on a write to a slow stderr pipe or disk.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from mesh_gateway.telemetry.logs import LineBuffer

REDACTED = "[REDACTED]"
DEFAULT_REDACT = ("authorization", "cookie", "proxy-authorization", "set-cookie")


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    decision_id: str
    route: str
    principal: str
    method: str
    path: str
    result: str
    http_status: int
    duration_us: int
    revision: str
    engine: str
    query: str
    dry_run: bool
    trace_id: str
    span_id: str
    headers: dict[str, str]
    reason: str = ""
    cached: bool = False


class DecisionLog:
    def __init__(self, sink: str = "stderr", *, redact_headers: tuple[str, ...] = DEFAULT_REDACT,
                 wall: Callable[[], float] = time.time, stream: IO[str] | None = None,
                 flush_interval_s: float = 0.2) -> None:
        self._redact = frozenset(h.lower() for h in redact_headers)
        self._wall = wall
        self._owned: IO[str] | None = None
        out: IO[str] | None
        if stream is not None:
            out = stream
        elif sink == "stderr":
            out = sys.stderr
        elif sink == "off":
            out = None
        else:
            path = Path(sink)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._owned = out = path.open("a", encoding="utf-8")
        self._lines = LineBuffer(out, name="decision log", flush_interval_s=flush_interval_s) if out else None

    @property
    def enabled(self) -> bool:
        """False for sink `off`: callers need not build records that write() would drop."""
        return self._lines is not None

    @property
    def dropped(self) -> int:
        return self._lines.lost if self._lines else 0

    def redact(self, headers: dict[str, str]) -> dict[str, str]:
        return {name: (REDACTED if name in self._redact else value) for name, value in headers.items()}

    def write(self, record: DecisionRecord) -> None:
        if self._lines is None:
            return
        line: dict[str, Any] = {
            "decision_id": record.decision_id,
            "timestamp": datetime.fromtimestamp(self._wall(), UTC).isoformat(timespec="microseconds"),
            "route": record.route,
            "principal": record.principal,
            "method": record.method,
            "path": record.path,
            "result": record.result,
            "http_status": record.http_status,
            "duration_us": record.duration_us,
            "revision": record.revision,
            "engine": record.engine,
            "query": record.query,
            "dry_run": record.dry_run,
            "cached": record.cached,
            "trace_id": record.trace_id,
            "span_id": record.span_id,
            "headers": self.redact(record.headers),
        }
        if record.reason:
            line["reason"] = record.reason
        self._lines.add(json.dumps(line, separators=(",", ":")))

    def flush(self) -> None:
        if self._lines is not None:
            self._lines.flush()

    async def run(self) -> None:
        """Write batched lines until cancelled (a supervised task of the gateway or sidecar)."""
        if self._lines is not None:
            await self._lines.run()

    def close(self) -> None:
        self.flush()
        if self._owned is not None:
            self._owned.close()
            self._owned = None
