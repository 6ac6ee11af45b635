"""Span export: the bounded, counting export queue (a worker thread) and the OTLP exporter built from config."""

from __future__ import annotations

import collections
import inspect
import logging
import threading
import time
from dataclasses import dataclass

import grpc
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from mesh_gateway.config import ConfigError
from mesh_gateway.config import Tracing as TracingConfig

log = logging.getLogger(__name__)


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
