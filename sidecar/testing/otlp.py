"""An OTLP/HTTP traces receiver on loopback, for the tests and the telemetry benchmark: it accepts
`POST /v1/traces` (protobuf, as OpenTelemetry's exporters send it), decodes each
ExportTraceServiceRequest and keeps its spans; `GET /stats` answers how many came.

    python -m sidecar.testing.otlp --port 4318     # counts only; prints its port when ready
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from sidecar.testing.redis_server import free_port

PATH = "/v1/traces"
_PROTOBUF = "application/x-protobuf"

Value = str | bool | int | float | None


def value(any_value: AnyValue) -> Value:
    which = any_value.WhichOneof("value")
    if which in ("string_value", "bool_value", "int_value", "double_value"):
        decoded: Value = getattr(any_value, which)
        return decoded
    return None  # arrays, maps and bytes: the sidecar sends none


def attributes(pairs: Any) -> dict[str, Value]:
    out: dict[str, Value] = {}
    for pair in pairs:
        assert isinstance(pair, KeyValue)
        out[pair.key] = value(pair.value)
    return out


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    trace_id: str  # hex, as in a traceparent
    span_id: str
    parent_span_id: str  # "" for a root span
    trace_state: str
    kind: int  # SpanKind of the proto: 1 internal, 2 server, 3 client
    start_ns: int
    end_ns: int
    status_code: int  # 0 unset, 1 ok, 2 error
    attributes: dict[str, Value]
    resource: dict[str, Value]
    scope: str


@dataclass
class OtlpReceiver:
    keep: bool = True  # False: count only (the benchmark)
    spans: list[ReceivedSpan] = field(default_factory=list)
    exports: int = 0
    span_count: int = 0
    headers: list[dict[str, str]] = field(default_factory=list)  # of each export, lower-cased
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post(PATH, self._export)
        app.router.add_get("/stats", self._stats)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        port = port or free_port()
        await web.TCPSite(self._runner, host, port).start()
        self.url = f"http://{host}:{port}"
        return self.url

    async def collect(
        self, flush: Callable[[], Awaitable[object]], count: int, timeout_s: float = 10.0
    ) -> list[ReceivedSpan]:
        """The spans once `count` have come, `flush` (a tracer's) awaited meanwhile."""
        deadline = time.monotonic() + timeout_s
        while len(self.spans) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.spans)} of {count} spans exported")
            await flush()
            await asyncio.sleep(0.01)
        return self.spans

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _export(self, request: web.Request) -> web.Response:
        if request.content_type != _PROTOBUF:
            return web.Response(status=415, text=f"expected {_PROTOBUF}")
        body = await request.read()
        encoding = request.headers.get("content-encoding", "")
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        self.exports += 1
        if self.keep:
            self.headers.append({k.lower(): v for k, v in request.headers.items()})
        for resource_spans in message.resource_spans:
            resource = attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                self.span_count += len(scope_spans.spans)
                if not self.keep:
                    continue
                for span in scope_spans.spans:
                    self.spans.append(
                        ReceivedSpan(
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            trace_state=span.trace_state,
                            kind=span.kind,
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                            status_code=span.status.code,
                            attributes=attributes(span.attributes),
                            resource=resource,
                            scope=scope_spans.scope.name,
                        )
                    )
        reply = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=reply, content_type=_PROTOBUF)

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response({"exports": self.exports, "spans": self.span_count})


async def _main(host: str, port: int) -> None:
    receiver = OtlpReceiver(keep=False)
    url = await receiver.start(host, port)
    print(f"otlp receiver listening on {url}{PATH}", flush=True)
    try:
        await asyncio.Event().wait()  # until stopped (SIGTERM, Ctrl-C)
    finally:
        await receiver.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidecar.testing.otlp", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.monotonic()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args.host, args.port))
    print(f"stopped after {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
