"""Consul's blocking-query rules, pure and clock-injected so they are table-tested without a server.

From Consul's "Blocking Queries" documentation (implementation details):
- an index of 0 is never sent as a blocking index: it would return at once and spin, so treat it as 1;
- if the index goes backwards (snapshot restore, failover to a server behind the leader), reset to 0 and read
  the whole state afresh;
- a return is no guarantee of change: same index means nothing to do;
- rate-limit re-queries (a token bucket with a small burst) and back off exponentially with jitter on errors;
- the server adds up to wait/16 of jitter to `wait`, so the client's timeout must exceed wait + wait/16.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_WAIT_S = 300.0
MAX_WAIT_S = 600.0


@dataclass(frozen=True, slots=True)
class IndexStep:
    """What one answer means: the index to send next, whether the state may have changed, whether we reset."""

    next_index: int
    changed: bool
    reset: bool


def advance(sent: int, returned: int) -> IndexStep:
    # X-Consul-Index 0 is a Consul bug on some versions (or an empty, never-written table): sending 0 back would
    # make every query return at once and spin, so it counts as 1.
    returned = max(returned, 1)
    if returned < sent:
        return IndexStep(next_index=0, changed=True, reset=True)
    return IndexStep(next_index=returned, changed=returned != sent or sent == 0, reset=False)


def client_timeout_s(wait_s: float) -> float:
    """Longer than the longest answer Consul may take (wait plus its wait/16 jitter), plus room for the network."""
    return wait_s + wait_s / 16 + 1.0


def wait_param(wait_s: float) -> str:
    """Go duration text for `wait`; milliseconds keep sub-second waits (used in tests) exact."""
    return f"{round(wait_s * 1000)}ms"


class TokenBucket:
    """`rate_per_s` re-queries per second on average, `burst` at once; `delay()` takes a token."""

    __slots__ = ("_burst", "_clock", "_last", "_rate", "_tokens")

    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float]) -> None:
        self._rate = rate_per_s
        self._burst = float(burst)
        self._tokens = float(burst)
        self._clock = clock
        self._last = clock()

    def delay(self) -> float:
        """Seconds to wait before the next query may go out; the token is spent either way."""
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        self._tokens -= 1.0
        if self._tokens >= 0:
            return 0.0
        return -self._tokens / self._rate


class Backoff:
    """Exponential backoff with "equal jitter": half fixed, half random, so retries spread but still grow."""

    __slots__ = ("_attempt", "_base", "_max", "_rng")

    def __init__(self, base_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self._base = base_s
        self._max = max_s
        self._rng = rng or random.Random()
        self._attempt = 0

    @property
    def attempt(self) -> int:
        return self._attempt

    def next(self) -> float:
        ceiling = min(self._max, self._base * float(2 ** min(self._attempt, 30)))
        self._attempt += 1
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    def reset(self) -> None:
        self._attempt = 0
