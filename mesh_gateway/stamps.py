"""ISO-8601 UTC timestamps for the request path (access log, decision log, authz input), formatted once per second
rather than per call. Pure."""

from __future__ import annotations

import math
from datetime import UTC, datetime


class UtcStamps:
    """`now` (a Unix time) as `datetime.fromtimestamp(now, UTC).isoformat(timespec=...)` with the `+00:00` offset
    replaced by `suffix` — e.g. 2023-11-14T22:13:20.250Z (milliseconds) or 2023-11-14T22:13:20.250000+00:00
    (microseconds) — at about a third of the cost: the date and time of day are formatted once per second.
    fromtimestamp rounds the fraction to microseconds half-even (carrying into the next second), then isoformat
    truncates to the precision asked for; both steps are reproduced. Safe to share between threads: the cached
    second and its text are swapped as one tuple."""

    def __init__(self, *, timespec: str = "milliseconds", suffix: str = "Z") -> None:
        if timespec not in ("milliseconds", "microseconds"):
            raise ValueError(f"unsupported timespec {timespec!r}")
        self._millis = timespec == "milliseconds"
        self._suffix = suffix
        self._cached: tuple[int, str] = (-1, "")

    def __call__(self, now: float) -> str:
        second = math.floor(now)
        micros = round((now - second) * 1e6)
        if micros >= 1_000_000:
            second, micros = second + 1, micros - 1_000_000
        cached = self._cached
        if cached[0] != second:
            cached = self._cached = (second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S."))
        if self._millis:
            return f"{cached[1]}{micros // 1000:03d}{self._suffix}"
        return f"{cached[1]}{micros:06d}{self._suffix}"
