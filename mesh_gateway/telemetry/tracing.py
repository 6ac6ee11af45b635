"""OpenTelemetry behind the pipeline's Tracer/Span protocols (with export.py, the only modules importing it).

Cost model: the sampling decision is taken once, in ingress(). A span that is not sampled never touches the SDK:
`_QuietSpan` carries only ids, flags and the inbound baggage, so unsampled requests stay cheap and still propagate
one trace id upstream. A recorded span (`_LiveSpan`) keeps its fields itself and becomes an SDK ReadableSpan only
when it ends, for the export queue and the OTLP exporter (export.py) on a worker thread.
"""

from __future__ import annotations

import random
import re
import time

from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.b3 import B3MultiFormat, B3SingleFormat
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
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
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from mesh_gateway.config import Tracing as TracingConfig
from mesh_gateway.errors import GatewayError
from mesh_gateway.model import RequestInfo
from mesh_gateway.telemetry.export import ExportQueue, SpanStats, build_exporter
from mesh_gateway.telemetry.semconv import KNOWN_METHODS, AttributeValue, server_attributes

# Inbound copies of these are replaced on inject, so the upstream never sees the client's span as its parent.
TRACE_HEADERS = frozenset({"traceparent", "tracestate", "baggage", "b3", "x-b3-traceid", "x-b3-spanid",
                           "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags"})
_STATUS_KEY = "http.response.status_code"
_EMPTY = Context()
# The common inbound case, a lone version-00 traceparent, is parsed here; anything else goes to the propagators.
_TRACEPARENT_00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_SAMPLED = TraceFlags.SAMPLED
_RANDOM_TRACE_ID = TraceFlags.RANDOM_TRACE_ID  # W3C trace-context level 2: the trace id is random
_UNSET = Status(StatusCode.UNSET)
_ERROR = Status(StatusCode.ERROR)
# B3 extract understands both the single `b3` header and the x-b3-* set; W3C runs last so it wins when both appear.
_EXTRACTORS: tuple[TextMapPropagator, ...] = (B3MultiFormat(), TraceContextTextMapPropagator(),
                                              W3CBaggagePropagator())
_INJECTORS: dict[str, TextMapPropagator] = {"w3c": TraceContextTextMapPropagator(), "b3": B3SingleFormat(),
                                            "b3multi": B3MultiFormat()}


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
        self._resource = Resource({"service.name": service_name, "service.version": service_version,
                                   "service.instance.id": instance_id})
        self._scope = InstrumentationScope("mesh_gateway", service_version)
        if exporter is not None:
            self._queue = ExportQueue(exporter, max_queue_size=config.max_queue_size,
                                      max_batch_size=config.max_export_batch_size, delay_s=config.export_delay_s)

    @property
    def recording(self) -> bool:
        return self._queue is not None

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
        if carrier is not None and (trace_id := _unsampled_traceparent(carrier)) is not None:
            return _QuietSpan(self, trace_id, None, False, _EMPTY, None)  # the common inbound case, kept cheap
        base, parent = (_EMPTY, None) if carrier is None else _extract(carrier)
        rng = self._rng
        if parent is None:  # a new trace: the ratio decides
            sampled = rng.random() < self._ratio
            if not sampled or self._queue is None:
                return _QuietSpan(self, f"{rng.getrandbits(128) or 1:032x}", None, sampled, base, None)
            # Our own random trace id, flagged as such (W3C trace-context level 2), as the SDK does.
            context = SpanContext(rng.getrandbits(128) or 1, rng.getrandbits(64) or 1, is_remote=False,
                                  trace_flags=TraceFlags(_SAMPLED | _RANDOM_TRACE_ID))
        else:  # the client's decision is followed either way
            sampled = parent.trace_flags.sampled
            if not sampled or self._queue is None:
                return _QuietSpan(self, f"{parent.trace_id:032x}", None, sampled, base, parent.trace_state)
            context = SpanContext(parent.trace_id, rng.getrandbits(64) or 1, is_remote=False,
                                  trace_flags=TraceFlags(_SAMPLED | (parent.trace_flags & _RANDOM_TRACE_ID)),
                                  trace_state=parent.trace_state)
        return _LiveSpan(self, info.method if info.method in KNOWN_METHODS else "HTTP", context, parent,
                         SpanKind.SERVER, base, server_attributes(info))

    def child(self, parent: object, name: str, *, client: bool = False) -> _LiveSpan | _QuietSpan:
        if isinstance(parent, _QuietSpan):  # first: the common case by far
            return _QuietSpan(self, parent.trace_id, None, parent.sampled, parent.base, parent.state)
        if isinstance(parent, _LiveSpan):
            up = parent.span_context
            context = SpanContext(up.trace_id, self._rng.getrandbits(64) or 1, is_remote=False,
                                  trace_flags=up.trace_flags, trace_state=up.trace_state)
            return _LiveSpan(self, name, context, up, SpanKind.CLIENT if client else SpanKind.INTERNAL,
                             parent.base, {})
        return _QuietSpan(self, "", "", False, _EMPTY, None)  # no parent to follow: propagate nothing

    @property
    def resource(self) -> Resource:
        return self._resource

    @property
    def scope(self) -> InstrumentationScope:
        return self._scope

    def export(self, span: ReadableSpan) -> None:
        if self._queue is not None:
            self._queue.on_end(span)

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

    def force_flush(self, timeout_s: float = 5.0) -> bool:
        return self._queue.force_flush(int(timeout_s * 1000)) if self._queue else True


def _unsampled_traceparent(carrier: dict[str, str]) -> str | None:
    """The trace id if the headers are just a valid version-00 traceparent with the sampled flag clear."""
    found = _TRACEPARENT_00.fullmatch(carrier["traceparent"]) if carrier.keys() == {"traceparent"} else None
    if found is None or int(found[3], 16) & TraceFlags.SAMPLED or found[1] == _ZERO_TRACE or found[2] == _ZERO_SPAN:
        return None
    return found[1]


def _extract(carrier: dict[str, str]) -> tuple[Context, SpanContext | None]:
    """The inbound context (baggage, B3/W3C span) and the client's span if the headers carry a valid one."""
    found = _TRACEPARENT_00.fullmatch(carrier["traceparent"]) if carrier.keys() == {"traceparent"} else None
    if found is not None:
        parent = SpanContext(int(found[1], 16), int(found[2], 16), is_remote=True,
                             trace_flags=TraceFlags(int(found[3], 16) & TraceFlags.SAMPLED))
        return _EMPTY, parent if parent.is_valid else None
    base = _EMPTY
    for propagator in _EXTRACTORS:
        base = propagator.extract(carrier, context=base)
    parent = get_current_span(base).get_span_context()
    return base, parent if parent.is_valid else None


class _LiveSpan:
    """A recorded span. Not the SDK's Span: its start_span/set_attribute/end machinery (sampler, id generator,
    bounded attributes behind a lock, processor fan-out) cost ~30 µs per span. This keeps name, ids, kind, a plain
    attribute dict and the status, and on end() hands the export queue the SDK's own ReadableSpan, which is what
    the OTLP exporters encode. The sampling decision was already taken in ingress()."""

    __slots__ = ("_attributes", "_failed", "_kind", "_name", "_parent", "_start_ns", "_status", "_tracer", "base",
                 "span_context")
    recording = True

    def __init__(self, tracer: OtelTracer, name: str, span_context: SpanContext, parent: SpanContext | None,
                 kind: SpanKind, base: Context, attributes: dict[str, AttributeValue]) -> None:
        self._tracer = tracer
        self._name = name
        self.span_context = span_context
        self._parent = parent
        self._kind = kind
        self.base = base  # the inbound context: its baggage goes upstream with every child
        self._attributes: dict[str, AttributeValue] | None = attributes  # None once ended
        self._status = _UNSET
        self._failed = False
        self._start_ns = time.time_ns()

    @property
    def context(self) -> Context:
        """This span as the current span in the inbound context (keeps baggage), for the propagators."""
        return set_span_in_context(NonRecordingSpan(self.span_context), self.base)

    @property
    def trace_id(self) -> str:
        return format(self.span_context.trace_id, "032x")

    @property
    def span_id(self) -> str:
        return format(self.span_context.span_id, "016x")

    def set(self, key: str, value: AttributeValue) -> None:
        attributes = self._attributes
        if attributes is None:  # ended: the attributes belong to the exporter now
            return
        attributes[key] = value
        # Semantic conventions: a SERVER span errs on 5xx only (4xx is the client's fault); a CLIENT span on 4xx too.
        if key == _STATUS_KEY and isinstance(value, int) and not self._failed:  # keep fail()'s precise error.type
            limit = 500 if self._kind is SpanKind.SERVER else 400
            if value >= limit:
                attributes["error.type"] = str(value)
                self._status = _ERROR

    def rename(self, name: str) -> None:
        self._name = name

    def fail(self, error: GatewayError) -> None:
        if self._attributes is None:
            return
        self._failed = True
        self._attributes["error.type"] = error.kind
        if self._kind is not SpanKind.SERVER or error.status >= 500:
            self._status = Status(StatusCode.ERROR, str(error))

    def inject(self, headers: list[tuple[str, str]]) -> None:
        self._tracer.inject(self.context, headers)

    def end(self) -> None:
        attributes, self._attributes = self._attributes, None
        if attributes is not None:  # a second end() is ignored, as the SDK does
            self._tracer.export(ReadableSpan(
                self._name, self.span_context, self._parent, self._tracer.resource, attributes, kind=self._kind,
                status=self._status, start_time=self._start_ns, end_time=time.time_ns(),
                instrumentation_scope=self._tracer.scope))


class _QuietSpan:
    """A span that is not recorded: ids, the sampled flag and inbound baggage/tracestate, nothing else.

    Ids are kept as the hex text they are written as (traceparent, access log), formatted once. The span id is
    drawn on first use: most child spans (authz) are never asked for theirs."""

    __slots__ = ("_span_id", "base", "sampled", "state", "trace_id", "tracer")
    recording = False

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
