"""In-process OTLP trace receivers on 127.0.0.1:0: gRPC (the real TraceService from opentelemetry-proto) and
HTTP/protobuf (POST /v1/traces, served by aiohttp).

They keep every span received, flattened into `ReceivedSpan`s, so tests can assert on what Jaeger would show.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

KINDS = {Span.SPAN_KIND_INTERNAL: "internal", Span.SPAN_KIND_SERVER: "server", Span.SPAN_KIND_CLIENT: "client",
         Span.SPAN_KIND_PRODUCER: "producer", Span.SPAN_KIND_CONSUMER: "consumer"}
STATUSES = {Status.STATUS_CODE_UNSET: "unset", Status.STATUS_CODE_OK: "ok", Status.STATUS_CODE_ERROR: "error"}


def _value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, which) if which else None


def _attributes(items: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in items if isinstance(kv, KeyValue)}


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    status: str
    status_message: str
    resource: dict[str, Any]
    duration_ns: int


@dataclass
class OtlpReceiver:
    spans: list[ReceivedSpan] = field(default_factory=list)
    requests: int = 0
    started: int = 0
    hold: threading.Event | None = None
    """When given, every Export waits for it: a collector that accepted the call and hangs."""
    metadata: list[dict[str, str]] = field(default_factory=list)
    port: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, port: int = 0, *, tls: tuple[bytes, bytes] | None = None) -> OtlpReceiver:
        """`tls` = (certificate chain PEM, key PEM) serves OTLP over TLS instead of plaintext."""
        receiver = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:  # the gRPC method's own name
                with receiver._lock:
                    receiver.started += 1
                if receiver.hold is not None:
                    receiver.hold.wait(30)
                receiver._store(request, {k: str(v) for k, v in context.invocation_metadata()})
                return trace_service_pb2.ExportTraceServiceResponse()

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self._server)
        if tls is None:
            self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        else:
            credentials = grpc.ssl_server_credentials([(tls[1], tls[0])])
            self.port = self._server.add_secure_port(f"127.0.0.1:{port}", credentials)
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None

    def _store(self, request: Any, metadata: dict[str, str]) -> None:
        received = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(ReceivedSpan(
                        name=span.name, kind=KINDS.get(span.kind, "unspecified"), trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(), parent_span_id=span.parent_span_id.hex(),
                        attributes=_attributes(span.attributes), status=STATUSES[span.status.code],
                        status_message=span.status.message, resource=resource,
                        duration_ns=span.end_time_unix_nano - span.start_time_unix_nano))
        with self._lock:
            self.requests += 1
            self.metadata.append(metadata)
            self.spans.extend(received)

    def snapshot(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self.spans)

    def named(self, name: str) -> list[ReceivedSpan]:
        return [s for s in self.snapshot() if s.name == name]

    async def wait_for(self, predicate: Callable[[list[ReceivedSpan]], bool], timeout_s: float = 10.0
                       ) -> list[ReceivedSpan]:
        """Poll until `predicate(spans)` holds; fail with what arrived when the deadline passes."""
        deadline = time.monotonic() + timeout_s
        while True:
            spans = self.snapshot()
            if predicate(spans):
                return spans
            if time.monotonic() > deadline:
                raise AssertionError(f"spans never matched; received {[(s.name, s.kind) for s in spans]}")
            await asyncio.sleep(0.02)


class OtlpHttpReceiver(OtlpReceiver):
    """OTLP over HTTP/protobuf; runs on the test's event loop (the exporter posts from its own thread)."""

    _runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    async def start_http(self) -> OtlpHttpReceiver:
        async def export(request: web.Request) -> web.Response:
            if request.content_type != "application/x-protobuf":
                return web.Response(status=415)
            message = trace_service_pb2.ExportTraceServiceRequest()
            message.ParseFromString(await request.read())
            self._store(message, {k.lower(): v for k, v in request.headers.items()})
            body = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            return web.Response(body=body, content_type="application/x-protobuf")

        app = web.Application()
        app.router.add_post("/v1/traces", export)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop_http(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
