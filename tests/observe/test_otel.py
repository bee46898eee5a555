"""The tracer of `[telemetry]` against a real OTLP/HTTP receiver on loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from sidecar import __version__
from sidecar.observe import otel
from sidecar.observe.otel import OtelTracer
from sidecar.observe.otel_export import Config
from sidecar.testing.otlp import OtlpReceiver

PARENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN = "b7ad6b7169203331"
SAMPLED = {"traceparent": f"00-{PARENT_TRACE}-{PARENT_SPAN}-01", "tracestate": "vendor=abc"}
UNSAMPLED = {"traceparent": f"00-{PARENT_TRACE}-{PARENT_SPAN}-00"}

MakeTracer = Callable[..., Awaitable[OtelTracer]]


@pytest.fixture
async def make_tracer(otlp: OtlpReceiver) -> AsyncIterator[MakeTracer]:
    made: list[OtelTracer] = []

    async def make(sample_ratio: float = 1.0, **overrides: Any) -> OtelTracer:
        options: dict[str, Any] = {
            "endpoint": otlp.url + "/v1/traces",
            "headers": {},
            "service_name": "llm-sidecar",
            "service_version": __version__,
            "timeout_s": 5.0,
        }
        tracer = OtelTracer(Config(**(options | overrides)), sample_ratio)
        await tracer.open()
        made.append(tracer)
        return tracer

    yield make
    for tracer in made:
        await tracer.close()


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(what)


def traceparent(propagated: list[tuple[str, str]]) -> list[str]:
    headers = dict(propagated)
    assert set(headers) <= {"traceparent", "tracestate"}
    return headers["traceparent"].split("-")


async def test_a_span_continues_the_callers_trace_and_names_itself_downstream(
    otlp: OtlpReceiver, make_tracer: MakeTracer
) -> None:
    tracer = await make_tracer(headers={"authorization": "Bearer collector-secret"})
    start = time.time_ns() - 5_000_000
    span = tracer.start("chat gpt-4o", SAMPLED, start, server=True)
    assert span.recording
    propagated = span.propagation()
    end = time.time_ns()
    span.finish({"gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 7}, end)

    [got] = await otlp.collect(tracer.flush, 1)
    assert (got.trace_id, got.parent_span_id) == (PARENT_TRACE, PARENT_SPAN)
    assert traceparent(propagated) == ["00", PARENT_TRACE, got.span_id, "01"]
    assert dict(propagated)["tracestate"] == "vendor=abc" == got.trace_state
    assert got.name == "chat gpt-4o"
    assert got.kind == 2  # SERVER
    assert (got.start_ns, got.end_ns) == (start, end)
    assert got.status_code == 0  # unset
    assert got.attributes == {"gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 7}
    assert got.resource["service.name"] == "llm-sidecar"
    assert got.resource["service.version"] == __version__
    assert got.scope == "sidecar"
    assert otlp.headers[0]["authorization"] == "Bearer collector-secret"
    assert otlp.headers[0]["content-type"] == "application/x-protobuf"


async def test_without_a_parent_a_span_starts_a_trace(
    otlp: OtlpReceiver, make_tracer: MakeTracer
) -> None:
    tracer = await make_tracer()
    span = tracer.start("embeddings", {"x-other": "1"}, time.time_ns(), server=False)
    version, trace_id, span_id, flags = traceparent(span.propagation())
    span.finish({}, time.time_ns(), error="500")
    [got] = await otlp.collect(tracer.flush, 1)
    assert version == "00" and int(flags, 16) & 1  # sampled (0x02: its trace id is random)
    assert (got.trace_id, got.span_id, got.parent_span_id) == (trace_id, span_id, "")
    assert trace_id != PARENT_TRACE and int(trace_id, 16) != 0
    assert got.kind == 1  # INTERNAL: hook mode reports on a request the proxy made
    assert got.status_code == 2  # error
    assert got.attributes == {"error.type": "500"}


async def test_a_malformed_traceparent_is_ignored(
    otlp: OtlpReceiver, make_tracer: MakeTracer
) -> None:
    tracer = await make_tracer()
    span = tracer.start("chat", {"traceparent": "00-zz-not-a-trace"}, time.time_ns(), server=True)
    span.finish({}, time.time_ns())
    [got] = await otlp.collect(tracer.flush, 1)
    assert got.parent_span_id == ""


async def test_sampling_follows_the_ratio_and_the_callers_flag(
    otlp: OtlpReceiver, make_tracer: MakeTracer
) -> None:
    tracer = await make_tracer(sample_ratio=0.0)
    root = tracer.start("chat", {}, time.time_ns(), server=True)
    unsampled = tracer.start("chat", UNSAMPLED, time.time_ns(), server=True)
    sampled = tracer.start("chat sampled", SAMPLED, time.time_ns(), server=True)
    assert (root.recording, unsampled.recording, sampled.recording) == (False, False, True)
    # Not recorded, but the trace still goes on upstream, marked not sampled.
    assert not int(traceparent(root.propagation())[3], 16) & 1
    assert traceparent(unsampled.propagation())[1] == PARENT_TRACE
    for span in (root, unsampled, sampled):
        span.finish({}, time.time_ns())
    [got] = await otlp.collect(tracer.flush, 1)
    assert got.name == "chat sampled"
    assert await tracer.flush()
    assert len(otlp.spans) == 1


async def test_close_sends_what_is_queued(otlp: OtlpReceiver, make_tracer: MakeTracer) -> None:
    tracer = await make_tracer()
    for i in range(3):
        tracer.start(f"chat {i}", {}, time.time_ns(), server=True).finish({}, time.time_ns())
    await tracer.close()
    assert sorted(span.name for span in otlp.spans) == ["chat 0", "chat 1", "chat 2"]
    # Closed: no more spans, and no error for a late one.
    tracer.start("late", {}, time.time_ns(), server=True).finish({}, time.time_ns())
    assert len(otlp.spans) == 3


async def test_an_unreachable_collector_costs_the_caller_nothing(make_tracer: MakeTracer) -> None:
    from sidecar.testing.redis_server import free_port

    tracer = await make_tracer(endpoint=f"http://127.0.0.1:{free_port()}/v1/traces", timeout_s=0.5)
    started = time.perf_counter()
    for _ in range(100):
        tracer.start("chat", {}, time.time_ns(), server=True).finish({}, time.time_ns())
    assert time.perf_counter() - started < 0.5  # queued; the export fails in another process
    assert await tracer.flush()  # the exporter gave them up: nothing waits
    assert tracer.dropped == 0


async def test_an_exporter_that_dies_is_started_again(
    otlp: OtlpReceiver,
    make_tracer: MakeTracer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(otel, "RESTART_S", 0.2)
    tracer = await make_tracer()
    first = tracer.exporter
    assert first is not None
    first.kill()
    await first.wait()
    # Until it is back, spans are counted and dropped; the requests do not wait for it.
    await until(lambda: tracer.exporter is not first, "the dead exporter was not noticed")
    tracer.start("lost", {}, time.time_ns(), server=True).finish({}, time.time_ns())
    tracer._records.send()  # now, not in SEND_EVERY_S
    assert tracer.dropped == 1
    await until(lambda: tracer.exporter is not None, "the exporter was not started again")
    tracer.start("kept", {}, time.time_ns(), server=True).finish({}, time.time_ns())
    [got] = await otlp.collect(tracer.flush, 1)
    assert got.name == "kept"
    assert "the span exporter exited (status -9); starting it again" in caplog.text
    assert "1 spans dropped in all" in caplog.text
