"""The tracer `[telemetry]` turns on: OpenTelemetry's SDK, its BatchSpanProcessor queueing ended
spans and its OTLP/HTTP exporter sending them from the processor's thread. Only this module
imports OpenTelemetry (the `otel` extra); the composition root imports it only when enabled."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from sidecar.observe.tracing import Attributes

_propagator = TraceContextTextMapPropagator()
_NO_PARENT = Context()  # not the ambient context: nothing here attaches one
_ERROR = Status(StatusCode.ERROR)
# The batch processor warns once per span it drops when its queue is full (the collector is
# down or slow): at a few thousand requests a second, a line per request.
_QUIET_LOGGERS = ("opentelemetry.sdk._shared_internal", "opentelemetry.sdk.trace.export")
QUIET_S = 60.0


class OtelSpan:
    __slots__ = ("_span",)

    def __init__(self, span: trace.Span) -> None:
        self._span = span

    @property
    def recording(self) -> bool:
        return self._span.is_recording()

    def propagation(self) -> list[tuple[str, str]]:
        carrier: dict[str, str] = {}
        _propagator.inject(carrier, trace.set_span_in_context(self._span, _NO_PARENT))
        return list(carrier.items())

    def finish(self, attributes: Attributes, end_ns: int, error: str | None = None) -> None:
        span = self._span
        if error is not None:
            attributes["error.type"] = error
            span.set_status(_ERROR)
        span.set_attributes(attributes)
        span.end(end_time=end_ns)


class OtelTracer:
    def __init__(
        self,
        *,
        endpoint: str,
        headers: Mapping[str, str],
        service_name: str,
        service_version: str,
        sample_ratio: float,
        timeout_s: float,
    ) -> None:
        self.endpoint = endpoint
        self.headers = dict(headers)
        self.resource = {"service.name": service_name, "service.version": service_version}
        self.sample_ratio = sample_ratio
        self.timeout_s = timeout_s
        self._provider: TracerProvider | None = None
        self._tracer: trace.Tracer = trace.NoOpTracer()  # until open()

    def open(self) -> None:
        _quieten()
        provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(self.sample_ratio)),
            # OTEL_RESOURCE_ATTRIBUTES adds to these (deployment.environment, host.name, ...).
            resource=Resource.create(self.resource),
            shutdown_on_exit=False,  # close() does it
        )
        exporter = OTLPSpanExporter(
            endpoint=self.endpoint,
            # Without headers here, OTEL_EXPORTER_OTLP_TRACES_HEADERS / _HEADERS supply them.
            headers=self.headers or None,
            timeout=self.timeout_s,
        )
        provider.add_span_processor(BatchSpanProcessor(exporter))
        self._provider = provider
        self._tracer = provider.get_tracer("sidecar", self.resource["service.version"])

    def start(
        self, name: str, carrier: Mapping[str, str], start_ns: int, *, server: bool
    ) -> OtelSpan:
        parent = _propagator.extract(carrier) if "traceparent" in carrier else _NO_PARENT
        kind = SpanKind.SERVER if server else SpanKind.INTERNAL
        return OtelSpan(self._tracer.start_span(name, parent, kind, start_time=start_ns))

    def flush(self) -> bool:
        """Export every ended span now (blocking)."""
        return self._provider is not None and self._provider.force_flush(int(self.timeout_s * 1000))

    async def close(self) -> None:
        provider, self._provider = self._provider, None
        self._tracer = trace.NoOpTracer()
        if provider is not None:
            await asyncio.to_thread(provider.shutdown)


class _Quiet(logging.Filter):
    """Each message at most once per QUIET_S, with how many of it were left out since."""

    def __init__(self) -> None:
        super().__init__()
        self.last: dict[str, tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        shown, left_out = self.last.get(record.msg, (-QUIET_S, 0))
        if now - shown < QUIET_S:
            self.last[record.msg] = (shown, left_out + 1)
            return False
        self.last[record.msg] = (now, 0)
        if left_out:
            record.msg = f"{record.msg} ({left_out} more like it in the last {QUIET_S:.0f} s)"
        return True


def _quieten() -> None:
    for name in _QUIET_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Quiet) for f in logger.filters):
            logger.addFilter(_Quiet())
