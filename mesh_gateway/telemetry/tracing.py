"""OpenTelemetry behind the pipeline's Tracer/Span protocols. The only module that imports opentelemetry.

Cost model: a recorded span goes through the SDK (attributes, batching, OTLP export on a worker thread). A span
that is not sampled never touches the SDK: `_QuietSpan` carries only ids, flags and the inbound baggage, so
unsampled requests stay cheap and still propagate one trace id upstream.
"""

from __future__ import annotations

import collections
import inspect
import logging
import random
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.b3 import B3MultiFormat, B3SingleFormat
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    get_current_span,
    set_span_in_context,
)
from opentelemetry.trace import Span as OtelSpan
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from mesh_gateway.config import ConfigError
from mesh_gateway.config import Tracing as TracingConfig
from mesh_gateway.errors import GatewayError
from mesh_gateway.model import RequestInfo
from mesh_gateway.telemetry.semconv import KNOWN_METHODS, AttributeValue, server_attributes

log = logging.getLogger(__name__)

# Inbound copies of these are replaced on inject, so the upstream never sees the client's span as its parent.
TRACE_HEADERS = frozenset({"traceparent", "tracestate", "baggage", "b3", "x-b3-traceid", "x-b3-spanid",
                           "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags"})
_STATUS_KEY = "http.response.status_code"
_EMPTY = Context()
# The common inbound case, a lone version-00 traceparent, is parsed here; anything else goes to the propagators.
_TRACEPARENT_00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_NO_PARENT = SpanContext(0, 0, is_remote=False)
# B3 extract understands both the single `b3` header and the x-b3-* set; W3C runs last so it wins when both appear.
_EXTRACTORS: tuple[TextMapPropagator, ...] = (B3MultiFormat(), TraceContextTextMapPropagator(),
                                              W3CBaggagePropagator())
_INJECTORS: dict[str, TextMapPropagator] = {"w3c": TraceContextTextMapPropagator(), "b3": B3SingleFormat(),
                                            "b3multi": B3MultiFormat()}


@dataclass(frozen=True, slots=True)
class SpanStats:
    exported: int
    dropped_queue_full: int
    dropped_export_failed: int


class ExportQueue(SpanProcessor):
    """Bounded batching span processor: `on_end` never blocks, a full queue drops (and counts) the span.

    The SDK's BatchSpanProcessor drops too but only logs; the gateway needs the count for /metrics. Spans end on the
    event-loop thread and are exported by one worker thread, so each counter has a single writer.
    """

    def __init__(self, exporter: SpanExporter, *, max_queue_size: int, max_batch_size: int,
                 delay_s: float) -> None:
        self._exporter = exporter
        self._max_queue = max_queue_size
        self._batch = max_batch_size
        self._delay_s = delay_s
        self._queue: collections.deque[ReadableSpan] = collections.deque()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._stopping = False
        self.exported = 0
        self.dropped_queue_full = 0
        self.dropped_export_failed = 0
        self.abandoned = 0
        self._thread = threading.Thread(target=self._run, name="mesh-gateway-span-export", daemon=True)
        self._thread.start()

    def on_end(self, span: ReadableSpan) -> None:
        if self._stopping or len(self._queue) >= self._max_queue:
            self.dropped_queue_full += 1
            return
        self._queue.append(span)
        self._idle.clear()
        if len(self._queue) >= self._batch:
            self._wake.set()

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self._delay_s)
            self._wake.clear()
            self._drain()
        self._drain()

    def _drain(self) -> None:
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(self._batch, len(self._queue)))]
            try:
                ok = self._exporter.export(batch) is SpanExportResult.SUCCESS
            except Exception:  # an exporter bug must not kill the worker; the batch is lost and counted
                log.exception("span export raised")
                ok = False
            if ok:
                self.exported += len(batch)
            else:
                self.dropped_export_failed += len(batch)
        self._idle.set()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        deadline = time.monotonic() + timeout_millis / 1000
        # `idle` can be set a moment before a span lands in the queue, so check the queue too and go round again.
        while time.monotonic() < deadline:
            self._wake.set()
            if self._idle.wait(max(0.0, deadline - time.monotonic())):
                if not self._queue:
                    return True
                time.sleep(0.001)  # the worker has not picked the late span up yet
        return False

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Export what is queued within `timeout_s`, then abandon the rest (the thread is a daemon)."""
        if self._stopping:
            return
        deadline = time.monotonic() + timeout_s
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():  # stuck in an export: what is still queued will never leave
            self.abandoned = len(self._queue)
            self._queue.clear()
        if "timeout_millis" in inspect.signature(self._exporter.shutdown).parameters:  # the gRPC exporter's
            remaining_ms = max(0.0, deadline - time.monotonic()) * 1000
            self._exporter.shutdown(timeout_millis=remaining_ms)  # type: ignore[call-arg]
        else:
            self._exporter.shutdown()


def build_exporter(config: TracingConfig) -> SpanExporter | None:
    if config.exporter == "none":
        return None
    endpoint = config.effective_endpoint
    headers = {name.lower(): value.get_secret_value() for name, value in config.headers.items()}
    roots: bytes | None = None
    if config.ca_file is not None:
        try:
            roots = config.ca_file.read_bytes()
        except OSError as exc:
            raise ConfigError([f"telemetry.tracing.ca_file: cannot read {config.ca_file}: {exc.strerror}"]) from None
    if config.exporter == "otlp_grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        tls = endpoint.startswith("https://")
        return GrpcExporter(endpoint=endpoint, insecure=not tls, headers=headers,
                            credentials=grpc.ssl_channel_credentials(roots) if tls else None,
                            timeout=config.export_timeout_s)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter(endpoint=endpoint, headers=headers, timeout=config.export_timeout_s,
                        certificate_file=str(config.ca_file) if config.ca_file else None)


class OtelTracer:
    """Implements pipeline.Tracer. Parent-based sampling: an inbound sampled flag is followed either way; a new
    trace is recorded with probability `sampling_ratio`."""

    def __init__(self, config: TracingConfig, *, service_name: str, service_version: str, instance_id: str,
                 exporter: SpanExporter | None = None, rng: random.Random | None = None) -> None:
        self._config = config
        self._ratio = config.sampling_ratio
        self._rng = rng or random.Random()  # ids and sampling need speed, not secrecy
        self._injectors = [_INJECTORS[name] for name in config.propagators] + [W3CBaggagePropagator()]
        self.w3c_only = config.propagators == ("w3c",)
        exporter = exporter if exporter is not None else build_exporter(config)
        self._queue: ExportQueue | None = None
        self._tracer: Any = None
        if exporter is not None:
            self._queue = ExportQueue(exporter, max_queue_size=config.max_queue_size,
                                      max_batch_size=config.max_export_batch_size, delay_s=config.export_delay_s)
            resource = Resource({"service.name": service_name, "service.version": service_version,
                                 "service.instance.id": instance_id})
            # The sampling decision is taken in ingress() before the SDK is called (unsampled spans never reach
            # it), so the SDK's own sampler only has to say yes.
            self._provider = TracerProvider(resource=resource, sampler=ALWAYS_ON,
                                            shutdown_on_exit=False)
            self._provider.add_span_processor(self._queue)
            self._tracer = self._provider.get_tracer("mesh_gateway", service_version)

    @property
    def recording(self) -> bool:
        return self._tracer is not None

    def stats(self) -> SpanStats:
        q = self._queue
        if q is None:
            return SpanStats(0, 0, 0)
        return SpanStats(q.exported, q.dropped_queue_full, q.dropped_export_failed + q.abandoned)

    def ingress(self, info: RequestInfo) -> _LiveSpan | _QuietSpan:
        carrier: dict[str, str] | None = None
        for name, value in info.headers:
            if name in TRACE_HEADERS:
                carrier = carrier if carrier is not None else {}
                carrier[name] = f"{carrier[name]},{value}" if name in carrier else value
        base = _EMPTY
        parent = _NO_PARENT
        if carrier is not None:
            found = _TRACEPARENT_00.fullmatch(carrier["traceparent"]) if carrier.keys() == {"traceparent"} else None
            if found is not None:
                parent = SpanContext(int(found[1], 16), int(found[2], 16), is_remote=True,
                                     trace_flags=TraceFlags(int(found[3], 16) & TraceFlags.SAMPLED))
            else:
                for propagator in _EXTRACTORS:
                    base = propagator.extract(carrier, context=base)
                parent = get_current_span(base).get_span_context()
        sampled = parent.trace_flags.sampled if parent.is_valid else self._rng.random() < self._ratio
        if not sampled or self._tracer is None:
            trace_id = parent.trace_id if parent.is_valid else self._rng.getrandbits(128) or 1
            return _QuietSpan(self, f"{trace_id:032x}", None, sampled, base,
                              parent.trace_state if parent.is_valid else None)
        if parent.is_valid and base is _EMPTY:
            base = set_span_in_context(NonRecordingSpan(parent), base)
        span = self._tracer.start_span(info.method if info.method in KNOWN_METHODS else "HTTP", context=base,
                                       kind=SpanKind.SERVER, attributes=server_attributes(info))
        return _LiveSpan(self, span, base, SpanKind.SERVER)

    def child(self, parent: object, name: str, *, client: bool = False) -> _LiveSpan | _QuietSpan:
        if isinstance(parent, _QuietSpan):  # first: the common case by far
            return _QuietSpan(self, parent.trace_id, None, parent.sampled, parent.base, parent.state)
        if isinstance(parent, _LiveSpan) and self._tracer is not None:
            kind = SpanKind.CLIENT if client else SpanKind.INTERNAL
            context = parent.context
            return _LiveSpan(self, self._tracer.start_span(name, context=context, kind=kind), context, kind)
        return _QuietSpan(self, "", "", False, _EMPTY, None)  # no parent to follow: propagate nothing

    def new_span_id(self) -> str:
        return f"{self._rng.getrandbits(64) or 1:016x}"

    def inject(self, context: Context, headers: list[tuple[str, str]]) -> None:
        carrier: dict[str, str] = {}
        for propagator in self._injectors:
            propagator.inject(carrier, context=context)
        headers[:] = [(n, v) for n, v in headers if n not in TRACE_HEADERS]
        headers.extend((n.lower(), v) for n, v in carrier.items())

    def shutdown(self, timeout_s: float | None = None) -> None:
        """Blocking, bounded by `timeout_s` (default from config); call it off the event loop."""
        if self._queue is not None:
            self._queue.shutdown(self._config.shutdown_timeout_s if timeout_s is None else timeout_s)
            self._provider.shutdown()

    def force_flush(self, timeout_s: float = 5.0) -> bool:
        return self._queue.force_flush(int(timeout_s * 1000)) if self._queue else True


class _LiveSpan:
    __slots__ = ("_base", "_context", "_failed", "_kind", "_span", "_tracer")

    def __init__(self, tracer: OtelTracer, span: OtelSpan, base: Context, kind: SpanKind) -> None:
        self._tracer = tracer
        self._span = span
        self._base = base
        self._kind = kind
        self._context: Context | None = None
        self._failed = False

    @property
    def context(self) -> Context:
        """This span as the current span in the inbound context (keeps baggage); built on first use."""
        if self._context is None:
            self._context = set_span_in_context(self._span, self._base)
        return self._context

    @property
    def trace_id(self) -> str:
        return format(self._span.get_span_context().trace_id, "032x")

    @property
    def span_id(self) -> str:
        return format(self._span.get_span_context().span_id, "016x")

    def set(self, key: str, value: AttributeValue) -> None:
        self._span.set_attribute(key, value)
        # Semantic conventions: a SERVER span errs on 5xx only (4xx is the client's fault); a CLIENT span on 4xx too.
        if key == _STATUS_KEY and isinstance(value, int) and not self._failed:  # keep fail()'s precise error.type
            limit = 500 if self._kind is SpanKind.SERVER else 400
            if value >= limit:
                self._span.set_attribute("error.type", str(value))
                self._span.set_status(Status(StatusCode.ERROR))

    def rename(self, name: str) -> None:
        self._span.update_name(name)

    def fail(self, error: GatewayError) -> None:
        self._failed = True
        self._span.set_attribute("error.type", error.kind)
        if self._kind is not SpanKind.SERVER or error.status >= 500:
            self._span.set_status(Status(StatusCode.ERROR, str(error)))

    def inject(self, headers: list[tuple[str, str]]) -> None:
        self._tracer.inject(self.context, headers)

    def end(self) -> None:
        self._span.end()


class _QuietSpan:
    """A span that is not recorded: ids, the sampled flag and inbound baggage/tracestate, nothing else.

    Ids are kept as the hex text they are written as (traceparent, access log), formatted once. The span id is
    drawn on first use: most child spans (authz) are never asked for theirs."""

    __slots__ = ("_span_id", "base", "sampled", "state", "trace_id", "tracer")

    def __init__(self, tracer: OtelTracer, trace_id: str, span_id: str | None, sampled: bool, base: Context,
                 state: TraceState | None) -> None:
        self.tracer = tracer
        self.trace_id = trace_id  # "" when there is no trace to follow
        self._span_id = span_id  # None: not drawn yet
        self.sampled = sampled
        self.base = base
        self.state = state

    @property
    def span_id(self) -> str:
        if self._span_id is None:
            self._span_id = self.tracer.new_span_id()
        return self._span_id

    def set(self, key: str, value: AttributeValue) -> None:
        pass

    def rename(self, name: str) -> None:
        pass

    def fail(self, error: GatewayError) -> None:
        pass

    def inject(self, headers: list[tuple[str, str]]) -> None:
        if not self.trace_id:
            return
        if self.tracer.w3c_only and self.base is _EMPTY and not self.state:
            headers[:] = [(n, v) for n, v in headers if n not in TRACE_HEADERS]
            headers.append(("traceparent", f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"))
            return
        flags = TraceFlags(TraceFlags.SAMPLED if self.sampled else TraceFlags.DEFAULT)
        context = SpanContext(int(self.trace_id, 16), int(self.span_id, 16), is_remote=False, trace_flags=flags,
                              trace_state=self.state)
        self.tracer.inject(set_span_in_context(NonRecordingSpan(context), self.base), headers)

    def end(self) -> None:
        pass
