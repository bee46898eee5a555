"""The span exporter process observe/otel.py starts: span records in on stdin, OpenTelemetry's
SDK spans out, queued and batched by its BatchSpanProcessor and sent by its OTLP/HTTP exporter.

Encoding a span for OTLP costs more CPU than the proxy spends on its request; done here, it
takes none of the worker's time or GIL. The records become the SDK's ReadableSpan as its tracer
would have made them, with the ids, sampling decision and times the worker chose.

stdin: frames of a 4-byte little-endian length and a msgpack body: first the config (a map),
then `["spans", [record, ...]]` or `["flush", n]` (answered `flushed n` on stdout once every
span before it is exported). At end of input, what is queued is exported and the process
exits. It ignores SIGINT and SIGTERM (a Ctrl-C reaches the sidecar's whole process group): the
worker's closing stdin ends it, a worker that dies included."""

from __future__ import annotations

import logging
import signal
import sys
import time
from typing import Any, BinaryIO

import msgspec

from sidecar import logs

_LENGTH = 4
# The batch processor warns once per span it drops when its queue is full (the collector is
# down or slow): at a few thousand requests a second, a line per request.
_QUIET_LOGGERS = ("opentelemetry.sdk._shared_internal", "opentelemetry.sdk.trace.export")
QUIET_S = 60.0

Record = tuple[str, int, bytes, bytes, bytes, int, str, int, int, "str | None", dict[str, Any]]
# name, kind (1 internal, 2 server), trace id (16 bytes), span id (8), parent span id (8, or
# empty), trace flags, tracestate header, start ns, end ns, error.type (None: no error),
# attributes


class Config(msgspec.Struct, frozen=True):
    endpoint: str
    headers: dict[str, str]
    service_name: str
    service_version: str
    timeout_s: float
    log_format: str = "json"
    log_level: str = "info"


def frame(payload: object) -> bytes:
    body = msgspec.msgpack.encode(payload)
    return len(body).to_bytes(_LENGTH, "little") + body


def read_frame(stream: BinaryIO) -> Any:
    """The next frame's payload; None at end of input."""
    head = stream.read(_LENGTH)
    if len(head) < _LENGTH:
        return None
    size = int.from_bytes(head, "little")
    body = stream.read(size)
    if len(body) < size:
        return None
    return msgspec.msgpack.decode(body)


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    stdin = sys.stdin.buffer
    raw = read_frame(stdin)
    if raw is None:
        return 0
    config = msgspec.convert(raw, Config)
    logs.configure(
        config.log_format,
        config.log_level,
        secrets=[v for v in config.headers.values() if len(v) >= 8],
    )
    # Imported here: the worker imports this module for `frame` alone.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
    from opentelemetry.trace.span import TraceState

    quieten()
    exporter = OTLPSpanExporter(
        endpoint=config.endpoint,
        # Without headers here, OTEL_EXPORTER_OTLP_TRACES_HEADERS / _HEADERS supply them.
        headers=config.headers or None,
        timeout=config.timeout_s,
    )
    processor = BatchSpanProcessor(exporter)
    # OTEL_RESOURCE_ATTRIBUTES adds to these (deployment.environment, host.name, ...).
    resource = Resource.create(
        {"service.name": config.service_name, "service.version": config.service_version}
    )
    scope = InstrumentationScope("sidecar", config.service_version)
    kinds = {1: SpanKind.INTERNAL, 2: SpanKind.SERVER}
    states: dict[str, TraceState] = {"": TraceState()}
    error = Status(StatusCode.ERROR)
    unset = Status(StatusCode.UNSET)

    def span(record: Record) -> ReadableSpan:
        name, kind, trace_id, span_id, parent_id, flags, state, start, end, failed, attrs = record
        trace = int.from_bytes(trace_id, "big")
        trace_state = states.get(state)
        if trace_state is None:
            trace_state = TraceState.from_header([state])
            if len(states) < 1024:
                states[state] = trace_state
        parent = None
        if parent_id:
            parent = SpanContext(trace, int.from_bytes(parent_id, "big"), is_remote=True)
        if failed is not None:
            attrs["error.type"] = failed
        return ReadableSpan(
            name,
            SpanContext(
                trace,
                int.from_bytes(span_id, "big"),
                is_remote=False,
                trace_flags=TraceFlags(flags),
                trace_state=trace_state,
            ),
            parent,
            resource,
            attrs,
            kind=kinds.get(kind, SpanKind.INTERNAL),
            status=error if failed is not None else unset,
            start_time=start,
            end_time=end,
            instrumentation_scope=scope,
        )

    while (payload := read_frame(stdin)) is not None:
        if payload[0] == "spans":
            for record in payload[1]:
                processor.on_end(span(record))
        elif payload[0] == "flush":
            processor.force_flush()
            print(f"flushed {payload[1]}", flush=True)
    processor.shutdown()  # type: ignore[no-untyped-call]  # the SDK's, unannotated
    return 0


class Quiet(logging.Filter):
    """Each message at most once per QUIET_S, with how many of it were left out since."""

    def __init__(self) -> None:
        super().__init__()
        self.last: dict[str, tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        key = str(record.msg)
        shown, left_out = self.last.get(key, (-QUIET_S, 0))
        if now - shown < QUIET_S:
            self.last[key] = (shown, left_out + 1)
            return False
        self.last[key] = (now, 0)
        if left_out:
            record.msg = f"{key} ({left_out} more like it in the last {QUIET_S:.0f} s)"
        return True


def quieten() -> None:
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).addFilter(Quiet())


if __name__ == "__main__":
    raise SystemExit(main())
