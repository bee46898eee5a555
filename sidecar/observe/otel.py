"""The tracer `[telemetry]` turns on. A span costs the request a few microseconds: its ids, its
sampling decision (the one OpenTelemetry's ParentBased(TraceIdRatioBased) sampler makes) and the
traceparent sent upstream are made here, and once the request is settled its attributes are
queued as one record. Every SEND_EVERY_S the records go to a child process
(observe/otel_export.py), where OpenTelemetry's SDK batches them (its BatchSpanProcessor) and
sends them (its OTLP/HTTP exporter). Encoding spans for OTLP costs more CPU than the proxy spends
on a request: in this process it would take the event loop's time and hold its GIL
(docs/benchmarks.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Mapping

import msgspec
from opentelemetry import trace
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from sidecar.observe.otel_export import Config, Record, frame
from sidecar.observe.tracing import Attributes
from sidecar.tasks import Batch

log = logging.getLogger("sidecar.telemetry")

EXPORTER = "sidecar.observe.otel_export"
SEND_EVERY_S = 0.1  # a span reaches the exporter process within this
BATCH = 512  # or as soon as this many are waiting
MAX_UNSENT_BYTES = 16 * 1024 * 1024  # written to the exporter, not yet read: beyond, dropped
RESTART_S = 1.0  # an exporter that exited is started again after this
DROPS_LOGGED_EVERY_S = 60.0

_propagator = TraceContextTextMapPropagator()
_SERVER, _INTERNAL = 2, 1  # SpanKind as the exporter's records say it


class OtelSpan:
    __slots__ = (
        "_tracer",
        "flags",
        "kind",
        "name",
        "parent_id",
        "span_id",
        "start_ns",
        "trace_id",
        "trace_state",
    )

    def __init__(
        self,
        tracer: OtelTracer,
        name: str,
        kind: int,
        trace_id: int,
        span_id: int,
        parent_id: int,
        flags: int,
        trace_state: str,
        start_ns: int,
    ) -> None:
        self._tracer = tracer
        self.name = name
        self.kind = kind
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id
        self.flags = flags
        self.trace_state = trace_state
        self.start_ns = start_ns

    @property
    def recording(self) -> bool:
        return bool(self.flags & 1)

    def propagation(self) -> list[tuple[str, str]]:
        parent = f"00-{self.trace_id:032x}-{self.span_id:016x}-{self.flags:02x}"
        if self.trace_state:
            return [("traceparent", parent), ("tracestate", self.trace_state)]
        return [("traceparent", parent)]

    def finish(self, attributes: Attributes, end_ns: int, error: str | None = None) -> None:
        if not self.flags & 1:
            return
        record: Record = (
            self.name,
            self.kind,
            self.trace_id.to_bytes(16, "big"),
            self.span_id.to_bytes(8, "big"),
            self.parent_id.to_bytes(8, "big") if self.parent_id else b"",
            self.flags,
            self.trace_state,
            self.start_ns,
            end_ns,
            error,
            attributes,
        )
        self._tracer.queue(record)


class OtelTracer:
    def __init__(self, config: Config, sample_ratio: float) -> None:
        self.config = config
        # OpenTelemetry's ParentBased(TraceIdRatioBased(ratio)), its two cases written out: a
        # remote parent's sampled flag decides; a new trace is kept when the low 64 bits of its
        # id fall under the ratio's bound.
        self.ratio = TraceIdRatioBased(sample_ratio)
        self.ids = RandomIdGenerator()
        self.dropped = 0  # spans given up: the exporter was not running or not keeping up
        self._records: Batch[Record] = Batch(BATCH, SEND_EVERY_S, self._send)
        self._process: asyncio.subprocess.Process | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._flushes: dict[int, asyncio.Future[None]] = {}
        self._flush_seq = 0
        self._closing = False
        self._drops_logged = -DROPS_LOGGED_EVERY_S

    # -- on the request path ------------------------------------------------------------------

    def start(
        self, name: str, carrier: Mapping[str, str], start_ns: int, *, server: bool
    ) -> OtelSpan:
        parent_id = 0
        trace_state = ""
        if "traceparent" in carrier:
            parent = trace.get_current_span(_propagator.extract(carrier)).get_span_context()
            if parent.is_valid:
                trace_id, parent_id = parent.trace_id, parent.span_id
                trace_state = parent.trace_state.to_header() if parent.trace_state else ""
                sampled = parent.trace_flags.sampled
        if not parent_id:
            trace_id = self.ids.generate_trace_id()
            sampled = trace_id & self.ratio.TRACE_ID_LIMIT < self.ratio.bound
        return OtelSpan(
            self,
            name,
            _SERVER if server else _INTERNAL,
            trace_id,
            self.ids.generate_span_id(),
            parent_id,
            1 if sampled else 0,
            trace_state,
            start_ns,
        )

    def queue(self, record: Record) -> None:
        self._records.add(record)

    def _send(self, records: list[Record]) -> None:
        stdin = self._process.stdin if self._process is not None else None
        if (
            stdin is None
            or stdin.is_closing()
            or stdin.transport.get_write_buffer_size() > MAX_UNSENT_BYTES
        ):
            self._drop(len(records))
            return
        stdin.write(frame(("spans", records)))

    def _drop(self, count: int) -> None:
        self.dropped += count
        now = time.monotonic()
        if now - self._drops_logged >= DROPS_LOGGED_EVERY_S:
            self._drops_logged = now
            log.warning(
                "%d spans dropped in all: the span exporter is not running or not keeping up",
                self.dropped,
            )

    # -- the exporter process -----------------------------------------------------------------

    @property
    def exporter(self) -> asyncio.subprocess.Process | None:
        """The exporter process (None while it is being started again)."""
        return self._process

    async def open(self) -> None:
        self._process = await self._spawn()
        self._keeper = asyncio.create_task(self._keep())

    async def _spawn(self) -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            EXPORTER,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C to the sidecar's group must not cut its export
        )
        assert process.stdin is not None
        process.stdin.write(frame(msgspec.structs.asdict(self.config)))
        return process

    async def _keep(self) -> None:
        """Read the exporter's answers; start it again should it exit before close()."""
        while True:
            process = self._process
            if process is not None:
                assert process.stdout is not None
                async for line in process.stdout:
                    self._answered(line)
                code = await process.wait()
                for done in self._flushes.values():
                    if not done.done():
                        done.set_exception(RuntimeError("the span exporter exited"))
                if self._closing:
                    return
                self._process = None
                log.error("the span exporter exited (status %s); starting it again", code)
            await asyncio.sleep(RESTART_S)
            try:
                self._process = await self._spawn()
            except OSError:
                log.exception("the span exporter cannot be started")

    def _answered(self, line: bytes) -> None:
        word, _, number = line.decode("ascii", "replace").partition(" ")
        if word != "flushed" or not number.strip().isdigit():
            return
        upto = int(number)
        for seq, done in self._flushes.items():
            if seq <= upto and not done.done():
                done.set_result(None)

    async def flush(self, timeout_s: float = 10.0) -> bool:
        """Every span finished so far handed to the collector (or given up by the exporter);
        False when that did not happen within `timeout_s`."""
        self._records.send()
        stdin = self._process.stdin if self._process is not None else None
        if stdin is None or stdin.is_closing():
            return False
        self._flush_seq += 1
        seq = self._flush_seq
        done = self._flushes[seq] = asyncio.get_running_loop().create_future()
        stdin.write(frame(("flush", seq)))
        try:
            await asyncio.wait_for(done, timeout_s)
        except (TimeoutError, RuntimeError):
            return False
        finally:
            del self._flushes[seq]
        return True

    async def close(self) -> None:
        """What is queued goes out: the exporter exports it all, within a few export timeouts,
        then exits."""
        self._closing = True
        self._records.send()
        process = self._process
        if process is not None and process.stdin is not None:
            process.stdin.close()  # its end of input, once what is written is read
            try:
                await asyncio.wait_for(process.wait(), self.config.timeout_s * 3 + 5)
            except TimeoutError:
                log.warning("the span exporter did not finish in time: stopped")
                process.kill()
                await process.wait()
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
