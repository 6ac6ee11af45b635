"""An optional per-route decision cache: LRU with a TTL, off unless a route opts in.

The key covers everything a typical policy reads: principal, method, route, normalised path, query string, the
policy revision (so a reload never serves a stale answer) and the values of the headers the route names. Only
successfully parsed decisions are stored; errors never are. A policy that reads other request attributes (the
body, the client address, the time) must not be cached — docs/authz.md says so.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from mesh_gateway.model import Decision, RequestInfo

CacheKey = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class CacheSettings:
    ttl_s: float
    max_entries: int
    headers: tuple[str, ...] = ()


def cache_key(info: RequestInfo, route_name: str, path: str, revision: str, query: str,
              headers: tuple[str, ...]) -> CacheKey:
    principal = str(info.peer_spiffe_id) if info.peer_spiffe_id else ""
    selected = tuple(f"{name}={info.header(name)}" for name in headers)
    return (principal, info.method, route_name, path, info.query, revision, query, *selected)


class DecisionCache:
    def __init__(self, settings: CacheSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._entries: OrderedDict[CacheKey, tuple[float, Decision]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: CacheKey) -> Decision | None:
        entry = self._entries.get(key)
        if entry is None or entry[0] <= self._clock():
            if entry is not None:
                del self._entries[key]
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[1]

    def put(self, key: CacheKey, decision: Decision) -> None:
        self._entries[key] = (self._clock() + self.settings.ttl_s, decision)
        self._entries.move_to_end(key)
        while len(self._entries) > self.settings.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
