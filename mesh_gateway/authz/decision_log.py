"""One JSON line per authorization decision, to stderr or an append-only file.

Fields: decision_id, timestamp, route, principal, method, path, result (allow|deny|error), http_status,
duration_us, revision, engine, query, dry_run, trace_id, span_id, headers (with configured headers redacted),
and reason for errors. Secrets never reach the line: redacted headers keep only their name.

Lines are batched in memory (telemetry.logs.LineBuffer) and written by `run()` every `flush_interval_s` or when the
buffer fills: a decision never waits on a write to a slow stderr pipe or disk.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _quote  # the C escaper json.dumps(ensure_ascii=True) uses
from pathlib import Path
from typing import IO

from mesh_gateway.stamps import UtcStamps
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


def decision_line(record: DecisionRecord, stamp: str, redact: frozenset[str]) -> str:
    """The record as one line of JSON, `headers` redacted: byte-for-byte what `json.dumps(fields, separators=(",",
    ":"))` of the fields in this order wrote before (tests/test_authz_decision_line.py checks it, hostile values
    included). Written by hand because json.dumps of a dict was most of a logged decision's cost. Strings go
    through json's own C escaper (ASCII output, as ensure_ascii), ints through int repr, as json.dumps does."""
    headers = ",".join([f"{_quote(name)}:{_REDACTED_JSON if name in redact else _quote(value)}"
                        for name, value in record.headers.items()])
    reason = f',"reason":{_quote(record.reason)}' if record.reason else ""
    return (f'{{"decision_id":{_quote(record.decision_id)},"timestamp":{_quote(stamp)},'
            f'"route":{_quote(record.route)},"principal":{_quote(record.principal)},'
            f'"method":{_quote(record.method)},"path":{_quote(record.path)},"result":{_quote(record.result)},'
            f'"http_status":{int(record.http_status)},"duration_us":{int(record.duration_us)},'
            f'"revision":{_quote(record.revision)},"engine":{_quote(record.engine)},"query":{_quote(record.query)},'
            f'"dry_run":{_BOOL[record.dry_run]},"cached":{_BOOL[record.cached]},'
            f'"trace_id":{_quote(record.trace_id)},"span_id":{_quote(record.span_id)},'
            f'"headers":{{{headers}}}{reason}}}')


_REDACTED_JSON = _quote(REDACTED)
_BOOL = {True: "true", False: "false"}


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
        self._stamps = UtcStamps(timespec="microseconds", suffix="+00:00")

    @property
    def enabled(self) -> bool:
        """False for sink `off`: callers need not build records that write() would drop."""
        return self._lines is not None

    @property
    def dropped(self) -> int:
        return self._lines.lost if self._lines else 0

    def write(self, record: DecisionRecord) -> None:
        if self._lines is None:
            return
        self._lines.add(decision_line(record, self._stamps(self._wall()), self._redact))

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
