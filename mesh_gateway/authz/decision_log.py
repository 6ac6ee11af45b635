"""One JSON line per authorization decision, to stderr or an append-only file.

Fields: decision_id, timestamp, route, principal, method, path, result (allow|deny|error), http_status,
duration_us, revision, engine, query, dry_run, trace_id, span_id, headers (with configured headers redacted),
and reason for errors. Secrets never reach the line: redacted headers keep only their name.
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
                 wall: Callable[[], float] = time.time, stream: IO[str] | None = None) -> None:
        self._redact = frozenset(h.lower() for h in redact_headers)
        self._wall = wall
        self._owned: IO[str] | None = None
        self.dropped = 0
        if stream is not None:
            self._stream: IO[str] | None = stream
        elif sink == "stderr":
            self._stream = sys.stderr
        elif sink == "off":
            self._stream = None
        else:
            path = Path(sink)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._owned = self._stream = path.open("a", encoding="utf-8", buffering=1)

    def redact(self, headers: dict[str, str]) -> dict[str, str]:
        return {name: (REDACTED if name in self._redact else value) for name, value in headers.items()}

    def write(self, record: DecisionRecord) -> None:
        if self._stream is None:
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
        try:
            self._stream.write(json.dumps(line, separators=(",", ":")) + "\n")
        except (OSError, ValueError):
            self.dropped += 1  # a full disk or closed stream must not turn into a failed request

    def close(self) -> None:
        if self._owned is not None:
            self._owned.close()
            self._owned = None
