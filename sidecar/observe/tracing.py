"""Spans of metered requests as the proxy and the settlement see them: a tracer's interface,
free of OpenTelemetry, which is an optional extra (`otel`). observe/otel.py implements it, and
the composition root builds it only when `[telemetry] enabled`."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Protocol

AttributeValue = str | bool | int | float
Attributes = dict[str, AttributeValue]

# What observe/otel.py needs of the `otel` extra.
EXTRA_MODULES = (
    "opentelemetry.sdk.trace",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
)
EXTRA_HINT = "pip install 'llm-identity-sidecar[otel]'"


def missing_extra() -> str | None:
    """The first module of the `otel` extra that cannot be imported, or None."""
    for name in EXTRA_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            return name
    return None


class Span(Protocol):
    @property
    def recording(self) -> bool:
        """False when the span is not sampled: its attributes need not be built."""
        ...

    def propagation(self) -> list[tuple[str, str]]:
        """`traceparent` (and `tracestate`) naming this span, for the request sent upstream."""
        ...

    def finish(self, attributes: Attributes, end_ns: int, error: str | None = None) -> None:
        """Set the attributes (once), mark a failure (`error` is its `error.type`), end it."""
        ...


class Tracer(Protocol):
    dropped: int  # spans given up before export (the exporter not running or not keeping up)

    def start(self, name: str, carrier: Mapping[str, str], start_ns: int, *, server: bool) -> Span:
        """A span started at `start_ns` (Unix ns), the child of the W3C trace context that
        `carrier` (request headers by lower-case name) holds, if any. `server`: the sidecar
        answers the request itself (inline mode); else it reports on one (hook mode)."""
        ...

    async def open(self) -> None:
        """Start exporting."""
        ...

    async def close(self) -> None:
        """Export what is queued, within the export timeout, and stop."""
        ...
