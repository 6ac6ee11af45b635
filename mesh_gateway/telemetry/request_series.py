"""The two per-request series, mesh_gateway_requests_total and mesh_gateway_request_duration_seconds, kept in
plain dicts and lists.

prometheus_client's Counter and Histogram take a lock and run argument checks on every increment: ~1 µs per
request for the pair, on a path whose whole budget is tens of µs. These two series are only ever updated from the
event-loop thread (HTTP/1.1, HTTP/2, WebSocket and grpc.aio edges all finish there), so plain ints and floats are
enough. A scrape reads them on the same thread. The exposition is what Counter/Histogram would write: the same
names, help, labels, cumulative buckets, _count, _sum and _created samples.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

REQUESTS = "mesh_gateway_requests"
REQUEST_DURATION = "mesh_gateway_request_duration_seconds"


class _Count:
    __slots__ = ("created", "value")

    def __init__(self, created: float) -> None:
        self.value = 0
        self.created = created


class _Durations:
    __slots__ = ("buckets", "created", "sum")

    def __init__(self, bucket_count: int, created: float) -> None:
        self.buckets = [0] * bucket_count  # not cumulative; the last one is +Inf
        self.sum = 0.0
        self.created = created


class RequestSeries(Collector):
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self._bounds = buckets
        # prometheus_client's own `le` formatting (it ships without annotations)
        self._labels = [*(floatToGoString(b) for b in buckets), "+Inf"]  # type: ignore[no-untyped-call]
        self._counts: dict[tuple[str, str, int], _Count] = {}
        self._durations: dict[str, _Durations] = {}

    def observe(self, route: str, method: str, status: int, duration_s: float) -> None:
        """One answered request: counted by (route, method, status), its duration by route."""
        count = self._counts.get((route, method, status))
        if count is None:
            count = self._counts[(route, method, status)] = _Count(time.time())
        count.value += 1
        durations = self._durations.get(route)
        if durations is None:
            durations = self._durations[route] = _Durations(len(self._labels), time.time())
        # Prometheus buckets are "less than or equal": bisect_left finds the first bound >= the duration.
        durations.buckets[bisect.bisect_left(self._bounds, duration_s)] += 1
        durations.sum += duration_s

    def collect(self) -> Iterable[Metric]:
        requests = CounterMetricFamily(REQUESTS, "Requests answered, by route, method and status code.",
                                       labels=("route", "method", "code"))
        for (route, method, status), count in list(self._counts.items()):
            requests.add_metric((route, method, str(status)), count.value, created=count.created)
        yield requests
        duration = HistogramMetricFamily(REQUEST_DURATION, "Time from request head to the last response byte.",
                                         labels=("route",))
        for route, durations in list(self._durations.items()):
            cumulative, buckets = 0, []
            for label, value in zip(self._labels, durations.buckets, strict=True):
                cumulative += value
                buckets.append((label, float(cumulative)))
            duration.add_metric((route,), buckets, durations.sum)
            duration.samples.append(Sample(f"{REQUEST_DURATION}_created", {"route": route}, durations.created))
        yield duration
