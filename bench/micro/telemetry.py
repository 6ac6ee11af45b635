"""Per-request telemetry cost, in-process: CPU µs per request for tracing + metrics + JSON access log.

    python bench/micro/telemetry.py [--iterations 20000] [--repeat 5] [--only NAME]

Builds the tracer, metrics and access log from a GatewayConfig the way app.py/process.py do (the `full` bench
variant's telemetry section: JSON access log to a file, metrics on, OTLP tracing), then runs, per request, exactly
the telemetry calls the edge and pipeline make: `tracer.ingress`, Exchange creation, route rename/set, the authz
child span with its four attributes, the upstream client child span with its attributes and `inject` into the
upstream headers, `HttpEdge.finish` (status attribute, ingress `end`, the completion hooks: `Gateway._completed`
→ metrics + access log). The authorizer (and MeteredAuthorizer's timing), forwarder and codec work are not
included. The access log really writes, to a file in a temp dir, in 64 KiB batches. Spans that are recorded are
encoded to OTLP protobuf by an in-process exporter on the export thread (what the OTLP/HTTP exporter does before
its POST); the queue is flushed inside each timed repetition so that work is counted (process_time covers every
thread).

Prints CPU µs per request (time.process_time), best of `--repeat` repetitions. The `part:` cases switch the other
parts off to attribute the cost; `baseline` is the loop with everything off (Exchange creation, no-op spans).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: run as `python bench/micro/…`

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from mesh_gateway import config as cfg
from mesh_gateway import headers as hdrs
from mesh_gateway.app import Gateway
from mesh_gateway.discovery.static import routes_from_config
from mesh_gateway.edges.http import HttpEdge, new_request_id
from mesh_gateway.model import Decision, Endpoint, PeerCert, RequestInfo, SpiffeId
from mesh_gateway.pipeline import Exchange, NoTracer
from mesh_gateway.process import access_log_and_tracer
from mesh_gateway.routing import compile_routes
from mesh_gateway.telemetry.metrics import Metrics
from mesh_gateway.telemetry.tracing import OtelTracer

GATEWAY_ID = SpiffeId.parse("spiffe://bench.local/gateway")
UPSTREAM_ID = SpiffeId.parse("spiffe://bench.local/upstream")
# What wrk sends, as the edge turns it into RequestInfo.headers (lower-cased names).
WRK_HEADERS = (("host", "127.0.0.1:8443"),)
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"


class EncodingSink(SpanExporter):
    """Does what the OTLP exporter does to a batch short of the HTTP POST: protobuf-encode it."""

    def __init__(self) -> None:
        self.bytes = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.bytes += len(encode_spans(spans).SerializeToString())
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def gateway_config(root: Path, ratio: float | None, exporter: str) -> cfg.GatewayConfig:
    telemetry: dict[str, Any] = {"access_log": {"path": str(root / "access.log")}}
    if ratio is not None:
        telemetry["tracing"] = {"exporter": exporter, "sampling_ratio": ratio,
                                "endpoint": "http://127.0.0.1:9/v1/traces"}
    return cfg.parse({
        "trust_domain": "bench.local",
        "listeners": [{"name": "edge", "address": "127.0.0.1:8443", "tls": {"client_auth": "optional"}}],
        "identity": {"ca_dir": str(root / "ca"), "spiffe_id": str(GATEWAY_ID)},
        "catalog": {"static": {"echo": [{"address": "127.0.0.1", "port": 9443, "spiffe_id": str(UPSTREAM_ID),
                                         "tls": "mtls"}]}},
        "routes": [{"name": "all", "match": {"path_prefix": "/"}, "service": "echo"}],
        "telemetry": telemetry,
    })


def build(root: Path, case: Case) -> tuple[Callable[[RequestInfo], None], Any]:
    ratio, exporter, _, parts = case
    config = gateway_config(root, ratio, exporter)
    access_log, tracer = access_log_and_tracer(config.telemetry, config.telemetry.service_name)
    metrics = Metrics() if config.telemetry.metrics.enabled else None
    if "log" not in parts:
        access_log = None
    if "metrics" not in parts:
        metrics = None
    if "trace" not in parts:
        tracer.shutdown(0.1)
        tracer = NoTracer()
    elif exporter != "none":  # same tracer, but spans go to the in-process encoding sink instead of a socket
        tracer.shutdown(0.1)
        tracer = OtelTracer(config.telemetry.tracing, service_name=config.telemetry.service_name,
                            service_version="bench", instance_id="bench", exporter=EncodingSink())
    # Gateway._completed is the completion hook app.py attaches to every edge; it only reads these two fields.
    completed = Gateway._completed.__get__(SimpleNamespace(metrics=metrics, access_log=access_log))
    edge = HttpEdge.__new__(HttpEdge)
    edge.on_complete = [completed]
    route = compile_routes(routes_from_config(config)).match(
        RequestInfo("GET", "/", "", "127.0.0.1:8443", "https", WRK_HEADERS, "127.0.0.1", 40000, "x"))
    endpoint = Endpoint("127.0.0.1", 9443, UPSTREAM_ID)
    decision = Decision(allowed=True, decision_id="6f1c0a3e9d2b4c7a8e5f1d3b2a4c6e8f", policy_revision="rev-1",
                        engine="embedded")
    peer = PeerCert(SpiffeId.parse("spiffe://bench.local/client"))

    def make_info(traceparent: str | None, with_peer: bool) -> RequestInfo:
        headers = WRK_HEADERS + ((("traceparent", traceparent),) if traceparent else ())
        return RequestInfo("GET", "/", "", "127.0.0.1:8443", "https", headers, "127.0.0.1", 40000,
                           new_request_id(), listener="edge", local_address="127.0.0.1", local_port=8443,
                           peer=peer if with_peer else None, sni="localhost")

    upstream_headers = hdrs.upstream_request_headers(make_info(None, with_peer=False), GATEWAY_ID)

    def one_request(info: RequestInfo) -> None:
        # HttpEdge.handle
        exchange = Exchange(info, span=tracer.ingress(info))
        # Pipeline.route
        exchange.route = route
        if exchange.span.recording:
            exchange.span.rename(f"{info.method} {route.name}")
            exchange.span.set("http.route", route.name)
        # Pipeline._authorize
        span = tracer.child(exchange.span, "authz")
        exchange.decision = decision
        if span.recording:
            span.set("mesh.authz.allowed", decision.allowed)
            span.set("mesh.authz.decision_id", decision.decision_id)
            span.set("mesh.authz.policy_revision", decision.policy_revision)
            span.set("mesh.authz.engine", decision.engine)
        span.end()
        exchange.endpoint = endpoint
        # Pipeline._forward
        headers = list(upstream_headers)  # Pipeline.upstream_headers builds a fresh list per request
        span = tracer.child(exchange.span, "upstream", client=True)
        if span.recording:
            span.set("server.address", endpoint.address)
            span.set("server.port", endpoint.port)
            if endpoint.spiffe_id is not None:
                span.set("mesh.upstream.spiffe_id", str(endpoint.spiffe_id))
        span.inject(headers)
        if span.recording:
            span.set("http.response.status_code", 200)
            span.set("mesh.upstream.retries", exchange.retries)
        span.end()
        # HttpEdge._write → finish
        edge.finish(exchange, 200, 24)

    return one_request, (make_info, tracer, access_log)


# name: (sampling ratio or None for no tracing section, exporter, inbound traceparent, parts switched on)
Case = tuple[float | None, str, str | None, frozenset[str]]
ALL = frozenset({"trace", "metrics", "log"})
CASES: dict[str, Case] = {
    "all, trace 1 %, no inbound context (bench `full`)": (0.01, "otlp_http", None, ALL),
    "all, trace 1 %, inbound unsampled traceparent": (0.01, "otlp_http", TRACEPARENT, ALL),
    "all, trace 100 %, OTLP encode": (1.0, "otlp_http", None, ALL),
    "all, tracing section absent (exporter none)": (None, "none", None, ALL),
    "part: trace 1 % only": (0.01, "otlp_http", None, frozenset({"trace"})),
    "part: trace 0 % only (the unsampled path alone)": (0.0, "otlp_http", None, frozenset({"trace"})),
    "part: metrics only": (0.01, "otlp_http", None, frozenset({"metrics"})),
    "part: access log only": (0.01, "otlp_http", None, frozenset({"log"})),
    "baseline: nothing on (loop overhead)": (0.01, "otlp_http", None, frozenset()),
}


def measure(name: str, iterations: int, repeat: int) -> float:
    traceparent = CASES[name][2]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        one_request, (make_info, tracer, access_log) = build(root, CASES[name])
        # Distinct request ids, as in real traffic; built outside the timed loop (that is the edge's cost).
        infos = [make_info(traceparent, with_peer=False) for _ in range(iterations)]
        for info in infos[:2000]:
            one_request(info)
        flush = getattr(tracer, "force_flush", lambda: True)
        flush()
        best = float("inf")
        for _ in range(repeat):
            started = time.process_time()
            for info in infos:
                one_request(info)
            flush()
            best = min(best, time.process_time() - started)
        if access_log is not None:
            access_log.close()
        if isinstance(tracer, OtelTracer):
            tracer.shutdown(1.0)
    return best / iterations * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", help="run the cases whose name contains this text")
    args = parser.parse_args()
    for name in CASES:
        if args.only and args.only not in name:
            continue
        print(f"{measure(name, args.iterations, args.repeat):8.2f} CPU µs/request  {name}", flush=True)


if __name__ == "__main__":
    main()
