"""The lock-free per-request series expose exactly what prometheus_client's Counter and Histogram would."""

from __future__ import annotations

import random
import re

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from mesh_gateway.telemetry.request_series import RequestSeries

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CREATED = re.compile(r"^(\S+_created\{.*\}) \S+$", re.MULTILINE)


def test_exposition_matches_prometheus_client_counter_and_histogram():
    reference = CollectorRegistry(auto_describe=True)
    requests = Counter("mesh_gateway_requests", "Requests answered, by route, method and status code.",
                       ("route", "method", "code"), registry=reference)
    duration = Histogram("mesh_gateway_request_duration_seconds", "Time from request head to the last response byte.",
                         ("route",), buckets=BUCKETS, registry=reference)
    ours = CollectorRegistry(auto_describe=True)
    series = RequestSeries(BUCKETS)
    ours.register(series)
    rng = random.Random(3)
    # Bucket bounds exactly, just around them, zero, and beyond the last bound (+Inf).
    durations = [*BUCKETS, *(b * (1 + 1e-12) for b in BUCKETS), 0.0, 45.0] + [rng.expovariate(20) for _ in range(500)]
    for duration_s in durations:
        route = rng.choice(["orders", "(none)", 'we"ird\\'])
        method = rng.choice(["GET", "POST", "OTHER"])
        status = rng.choice([200, 404, 503])
        requests.labels(route, method, str(status)).inc()
        duration.labels(route).observe(duration_s)
        series.observe(route, method, status, duration_s)
    expected = generate_latest(reference).decode()
    got = generate_latest(ours).decode()
    # Creation times differ by when each side saw its first sample; everything else is the same text.
    assert CREATED.sub(r"\1 T", got) == CREATED.sub(r"\1 T", expected)
    assert len(CREATED.findall(got)) == len(CREATED.findall(expected)) > 0
