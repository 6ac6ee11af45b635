"""Prometheus series for /metrics, on a registry of our own (never the process-global one).

Labels stay low-cardinality: route and service names, methods from a fixed set, status codes, results.
Never raw paths, hosts or peer identities.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from mesh_gateway.errors import UpstreamIdentityMismatch, UpstreamUnavailable
from mesh_gateway.model import BodyPrefix, Decision, RequestInfo, Route
from mesh_gateway.telemetry.request_series import RequestSeries
from mesh_gateway.telemetry.semconv import KNOWN_METHODS

if TYPE_CHECKING:
    from mesh_gateway.pipeline import Authorizer, Exchange

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Latency buckets from 1 ms to 30 s: a gateway hop is usually milliseconds, a slow upstream up to the route timeout.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_AUTHZ_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
NO_ROUTE = "(none)"


class SpanCounts(Protocol):
    """What the tracer reports about export (tracing.SpanStats), seen structurally."""

    @property
    def exported(self) -> int: ...
    @property
    def dropped_queue_full(self) -> int: ...
    @property
    def dropped_export_failed(self) -> int: ...


class Metrics:
    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._clock = clock
        r = self.registry
        self._requests = RequestSeries(_BUCKETS)  # requests_total and request_duration_seconds, lock-free
        r.register(self._requests)
        self.upstream_connect_errors = Counter("mesh_gateway_upstream_connect_errors",
                                               "Upstream connections that failed or were rejected.",
                                               ("service", "reason"), registry=r)
        self.upstream_retries = Counter("mesh_gateway_upstream_retries", "Upstream request retries.", ("service",),
                                        registry=r)
        self.upstream_ejections = Counter("mesh_gateway_upstream_ejections",
                                          "Endpoints ejected by outlier detection.", ("service",), registry=r)
        self.upstream_active_connections = Gauge("mesh_gateway_upstream_active_connections",
                                                 "Open upstream connections.", ("service",), registry=r)
        self.authz_decisions = Counter("mesh_gateway_authz_decisions", "Authorization decisions by result.",
                                       ("result",), registry=r)
        self.authz_duration = Histogram("mesh_gateway_authz_duration_seconds", "Time to reach a decision.",
                                        ("result",), buckets=_AUTHZ_BUCKETS, registry=r)
        self.cert_expiry = Gauge("mesh_gateway_cert_expiry_seconds", "Seconds until the certificate expires.",
                                 ("kind",), registry=r)
        self.cert_rotations = Counter("mesh_gateway_cert_rotations", "Certificate rotation attempts by result.",
                                      ("result",), registry=r)
        self.tls_handshake_errors = Counter("mesh_gateway_tls_handshake_errors", "Failed inbound TLS handshakes.",
                                            ("listener",), registry=r)
        self._discovery = _DiscoveryAge(clock)
        r.register(self._discovery)

    # -- called by the edge on completion -------------------------------------------------------------------
    def request_done(self, exchange: Exchange, duration_s: float) -> None:
        route = exchange.route.name if exchange.route else NO_ROUTE
        method = exchange.info.method if exchange.info.method in KNOWN_METHODS else "OTHER"
        self._requests.observe(route, method, exchange.status, duration_s)
        if exchange.route is not None:
            service = exchange.route.service
            if isinstance(exchange.error, UpstreamUnavailable | UpstreamIdentityMismatch):
                self.upstream_connect_errors.labels(service, exchange.error.kind).inc()
            if exchange.retries:
                self.upstream_retries.labels(service).inc(exchange.retries)

    # -- called by other features --------------------------------------------------------------------------
    def upstream_connect_error(self, service: str, reason: str) -> None:
        self.upstream_connect_errors.labels(service, reason).inc()

    def upstream_ejected(self, service: str) -> None:
        self.upstream_ejections.labels(service).inc()

    def upstream_connections(self, service: str, delta: int) -> None:
        self.upstream_active_connections.labels(service).inc(delta)

    def cert_expiry_source(self, kind: str, not_after: Callable[[], float]) -> None:
        """Report `not_after() - now` for `kind` (e.g. gateway, intermediate, root) at every scrape."""
        self.cert_expiry.labels(kind).set_function(lambda: not_after() - self._clock())

    def cert_rotated(self, result: str) -> None:
        """`result` is success or failure."""
        self.cert_rotations.labels(result).inc()

    def discovery_updated(self, services: Iterable[str], at: float | None = None) -> None:
        self._discovery.updated(services, self._clock() if at is None else at)

    def discovery_forget(self, service: str) -> None:
        self._discovery.forget(service)

    def tls_handshake_error(self, listener: str) -> None:
        self.tls_handshake_errors.labels(listener).inc()

    def span_source(self, stats: Callable[[], SpanCounts]) -> None:
        self.registry.register(_SpanExport(stats))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _DiscoveryAge(Collector):
    """Age is computed at scrape time, so a stalled watcher shows a growing number rather than a frozen one."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._updated: dict[str, float] = {}

    def updated(self, services: Iterable[str], at: float) -> None:
        for service in services:
            self._updated[service] = at

    def forget(self, service: str) -> None:
        self._updated.pop(service, None)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily("mesh_gateway_discovery_last_update_age_seconds",
                                   "Seconds since the service's endpoints were last updated.", labels=("service",))
        now = self._clock()
        for service, at in sorted(self._updated.items()):
            family.add_metric((service,), max(0.0, now - at))
        yield family


class _SpanExport(Collector):
    def __init__(self, stats: Callable[[], SpanCounts]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[CounterMetricFamily]:
        stats = self._stats()
        exported = CounterMetricFamily("mesh_gateway_trace_spans_exported", "Spans accepted by the collector.")
        exported.add_metric((), stats.exported)
        dropped = CounterMetricFamily("mesh_gateway_trace_spans_dropped",
                                      "Spans lost: export queue full or export failed.", labels=("reason",))
        dropped.add_metric(("queue_full",), stats.dropped_queue_full)
        dropped.add_metric(("export_failed",), stats.dropped_export_failed)
        yield exported
        yield dropped


class MeteredAuthorizer:
    """Wraps the configured authorizer to count decisions and time them; the pipeline stays unaware."""

    def __init__(self, inner: Authorizer, metrics: Metrics) -> None:
        self._inner = inner
        self._metrics = metrics
        # result → (counter child, histogram child), resolved on first use: `labels()` per decision took a lock and
        # built a key each time. Lazily, so /metrics shows no series for a result that never happened (as before).
        self._series: dict[str, tuple[Counter, Histogram]] = {}

    async def check(self, info: RequestInfo, route: Route, exchange: Exchange,
                    body: BodyPrefix | None = None) -> Decision:
        started = time.perf_counter()
        result = "error"
        try:
            decision = await (self._inner.check(info, route, exchange) if body is None
                              else self._inner.check(info, route, exchange, body))
            result = "allow" if decision.allowed else "deny"
            return decision
        finally:
            elapsed = time.perf_counter() - started
            series = self._series.get(result)
            if series is None:
                metrics = self._metrics
                series = self._series[result] = (metrics.authz_decisions.labels(result),
                                                 metrics.authz_duration.labels(result))
            series[0].inc()
            series[1].observe(elapsed)
