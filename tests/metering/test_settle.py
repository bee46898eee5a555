"""The spans of settled requests (answered inline, refused, reported to the hooks), end to end:
real clients through the sidecar to the mock upstream, spans exported over OTLP/HTTP to a
receiver on loopback and decoded there."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from ulid import ULID

from sidecar.observe.otel import OtelTracer
from sidecar.testing.otlp import OtlpReceiver, ReceivedSpan
from sidecar.testing.redis_server import free_port
from tests.support.auth import ADMIN_TOKEN
from tests.support.env import Env, MakeEnv

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
CALLER = {"traceparent": f"00-{TRACE}-{PARENT}-01", "tracestate": "congo=t61rcWkgMzE"}
MESSAGES: Any = [{"role": "user", "content": "Say hi"}]
CHAT = {"model": "gpt-4o", "messages": MESSAGES}
HOOK = {"x-sidecar-token": ADMIN_TOKEN}
SERVER, INTERNAL = 2, 1
UNSET, ERROR = 0, 2


def telemetry(otlp: OtlpReceiver, **more: Any) -> dict[str, Any]:
    return {"enabled": True, "endpoint": otlp.url + "/v1/traces", "timeout_s": 5, **more}


def tokens(input_tokens: int, output_tokens: int) -> dict[str, str]:
    return {"x-mock-input-tokens": str(input_tokens), "x-mock-output-tokens": str(output_tokens)}


async def spans(env: Env, otlp: OtlpReceiver, count: int) -> list[ReceivedSpan]:
    tracer = env.app.services.tracer
    assert isinstance(tracer, OtelTracer)
    await env.settle()
    return await otlp.collect(tracer.flush, count)


def client(env: Env) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=env.url + "/v1", api_key="sk-upstream", max_retries=0)


def upstream_traceparent(env: Env) -> list[str]:
    value = env.mock.requests[-1].header("traceparent")
    assert value is not None
    return value.split("-")


async def test_a_chat_span_continues_the_callers_trace_and_is_the_parent_upstream(
    otlp: OtlpReceiver, make_env: MakeEnv
) -> None:
    env = await make_env(telemetry=telemetry(otlp))
    before = time.time_ns()
    async with client(env) as oai:
        completion = await oai.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            extra_body={"identity": {"id": "traced-user", "display_name": "T"}},
            extra_headers={**CALLER, **tokens(1000, 500)},
        )
    after = time.time_ns()
    [span] = await spans(env, otlp, 1)
    assert span.name == "chat gpt-4o"
    assert span.kind == SERVER
    assert (span.trace_id, span.parent_span_id) == (TRACE, PARENT)
    assert span.trace_state == CALLER["tracestate"]
    assert before <= span.start_ns <= span.end_ns <= after
    assert span.status_code == UNSET
    attributes = dict(span.attributes)
    assert attributes.pop("sidecar.cost_usd") == pytest.approx(0.0075)  # gpt-4o's catalogue price
    assert attributes == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.system": "openai",
        "gen_ai.request.model": "gpt-4o",
        "gen_ai.response.model": completion.model,
        "gen_ai.usage.input_tokens": 1000,
        "gen_ai.usage.output_tokens": 500,
        "enduser.id": "traced-user",
        "sidecar.identity.source": "body",
        "http.response.status_code": 200,
    }
    assert span.resource["service.name"] == "llm-sidecar"
    # Upstream, the sidecar's span is the parent; the caller's tracestate goes along.
    forwarded = env.mock.requests[-1]
    assert forwarded.header("traceparent") == f"00-{TRACE}-{span.span_id}-01"
    assert forwarded.header("tracestate") == CALLER["tracestate"]
    assert [n for n, _ in forwarded.headers].count("traceparent") == 1
    metrics = (await env.api.get("/metrics")).text
    assert "\nsidecar_spans_dropped_total 0.0\n" in metrics


async def test_a_request_without_trace_context_starts_a_trace(
    otlp: OtlpReceiver, make_env: MakeEnv
) -> None:
    env = await make_env(telemetry=telemetry(otlp, service_name="gateway-sidecar"))
    async with client(env) as oai:
        await oai.embeddings.create(
            model="text-embedding-3-small",
            input=["a", "b"],
            extra_headers={"X-ORQ-IDENTITY-ID": "embedder", **tokens(12, 0)},
        )
    [span] = await spans(env, otlp, 1)
    assert span.name == "embeddings text-embedding-3-small"
    assert span.parent_span_id == ""
    assert span.attributes["gen_ai.operation.name"] == "embeddings"
    assert span.attributes["sidecar.identity.source"] == "header"
    assert span.attributes["gen_ai.usage.input_tokens"] == 12
    assert span.resource["service.name"] == "gateway-sidecar"
    assert upstream_traceparent(env)[1:3] == [span.trace_id, span.span_id]


async def test_anthropic_streams_are_spans_with_their_usage(
    otlp: OtlpReceiver, make_env: MakeEnv
) -> None:
    env = await make_env(telemetry=telemetry(otlp))
    async with (
        anthropic.AsyncAnthropic(
            base_url=env.url, api_key="sk-ant", max_retries=0, default_headers=CALLER
        ) as claude,
        claude.messages.stream(
            model="claude-sonnet-4-20250514",
            max_tokens=64,
            messages=MESSAGES,
            extra_headers=tokens(10, 7),
        ) as stream,
    ):
        await stream.get_final_message()
    [span] = await spans(env, otlp, 1)
    assert span.name == "chat claude-sonnet-4-20250514"
    assert span.attributes["gen_ai.provider.name"] == "anthropic"
    assert span.attributes["gen_ai.usage.input_tokens"] == 10
    assert span.attributes["gen_ai.usage.output_tokens"] == 7
    assert span.attributes["enduser.id"] == "anonymous"
    assert span.parent_span_id == PARENT
    assert upstream_traceparent(env)[2] == span.span_id


async def test_an_upstream_error_marks_the_span(otlp: OtlpReceiver, make_env: MakeEnv) -> None:
    env = await make_env(telemetry=telemetry(otlp))
    async with client(env) as oai:
        with pytest.raises(openai.InternalServerError):
            await oai.chat.completions.create(
                model="gpt-4o", messages=MESSAGES, extra_headers={"x-mock-status": "500"}
            )
        with pytest.raises(openai.RateLimitError):
            await oai.chat.completions.create(
                model="gpt-4o", messages=MESSAGES, extra_headers={"x-mock-status": "429"}
            )
    failed = await spans(env, otlp, 2)
    assert [s.status_code for s in failed] == [ERROR, ERROR]
    assert [s.attributes["http.response.status_code"] for s in failed] == [500, 429]
    assert [s.attributes["error.type"] for s in failed] == ["500", "429"]


async def test_an_unreachable_upstream_is_an_error_span(
    otlp: OtlpReceiver, make_env: MakeEnv
) -> None:
    env = await make_env(upstream_url=f"http://127.0.0.1:{free_port()}", telemetry=telemetry(otlp))
    async with client(env) as oai:
        with pytest.raises(openai.APIStatusError) as caught:
            await oai.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert caught.value.status_code == 502
    [span] = await spans(env, otlp, 1)
    assert span.status_code == ERROR
    assert span.attributes["error.type"] == "upstream_unreachable"
    assert span.attributes["http.response.status_code"] == 502
    assert "gen_ai.usage.input_tokens" not in span.attributes


@pytest.mark.slow  # waits out a 1 s upstream timeout
async def test_a_timeout_and_a_broken_stream_are_error_spans(
    otlp: OtlpReceiver, make_env: MakeEnv
) -> None:
    # The timeout covers the broken stream's wait for its head too: at 0.3 s a loaded machine
    # could time that stream out before its head (a 504, not a broken stream).
    env = await make_env(telemetry=telemetry(otlp), upstream={"timeout_s": 1.0})
    async with httpx.AsyncClient(base_url=env.url) as http:
        slow = {"x-mock-latency-ms": "2000"}
        r = await http.post("/v1/chat/completions", json=CHAT, headers=slow)
        assert r.status_code == 504
        with pytest.raises(httpx.RemoteProtocolError):
            broken = {**CHAT, "stream": True}
            await http.post("/v1/chat/completions", json=broken, headers={"x-mock-drop-after": "1"})
    timed_out, incomplete = await spans(env, otlp, 2)
    assert timed_out.attributes["error.type"] == "upstream_timeout"
    assert timed_out.attributes["http.response.status_code"] == 504
    assert incomplete.attributes["error.type"] == "response_incomplete"
    assert incomplete.attributes["http.response.status_code"] == 200  # the headers had gone out
    assert timed_out.status_code == incomplete.status_code == ERROR


async def test_a_refusal_is_a_span_naming_the_limit(
    otlp: OtlpReceiver, make_env: MakeEnv, tmp_path: Path
) -> None:
    policies = tmp_path / "policies.toml"
    policies.write_text('[[policy]]\nname = "tight"\nrequests = ["1/minute"]\n')
    env = await make_env(
        telemetry=telemetry(otlp), policies={"paths": [str(policies)]}, real_clock=True
    )
    async with client(env) as oai:
        await oai.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, extra_headers={"X-ORQ-IDENTITY-ID": "limited"}
        )
        with pytest.raises(openai.RateLimitError):
            await oai.chat.completions.create(
                model="gpt-4o",
                messages=MESSAGES,
                extra_headers={"X-ORQ-IDENTITY-ID": "limited", **CALLER},
            )
    assert len(env.mock.requests) == 1
    answered, refused = await spans(env, otlp, 2)
    assert answered.attributes["sidecar.policy"] == "tight"
    assert isinstance(answered.attributes["sidecar.request_id"], str)
    assert refused.attributes["http.response.status_code"] == 429
    assert refused.attributes["sidecar.limit.dimension"] == "requests"
    assert refused.attributes["sidecar.policy"] == "tight"
    assert refused.status_code == UNSET  # the sidecar doing its job, not a failure
    assert refused.parent_span_id == PARENT
    assert "gen_ai.usage.input_tokens" not in refused.attributes


async def test_a_refusal_by_the_key_owners_limit_names_the_owner(
    otlp: OtlpReceiver, make_env: MakeEnv, tmp_path: Path
) -> None:
    key = "sk-tenant-key-1"
    policies = tmp_path / "policies.toml"
    policies.write_text(
        '[[policy]]\nname = "tenant"\nmatch = { ids = ["tenant"] }\nrequests = ["1/minute"]\n'
        '[[policy]]\nname = "user"\nrequests = ["100/minute"]\n'
    )
    env = await make_env(
        telemetry=telemetry(otlp),
        policies={"paths": [str(policies)]},
        identity={"trust": "keys"},
        api_keys=[
            {
                "sha256": hashlib.sha256(key.encode()).hexdigest(),
                "owner": "tenant",
                "may_assert": ["tenant-user-*"],
            }
        ],
        real_clock=True,
    )
    async with httpx.AsyncClient(base_url=env.url) as http:
        statuses = []
        for user in ("tenant-user-1", "tenant-user-2"):
            headers = {"X-ORQ-IDENTITY-ID": user, "authorization": f"Bearer {key}"}
            r = await http.post("/v1/chat/completions", json=CHAT, headers=headers)
            statuses.append(r.status_code)
    assert statuses == [200, 429]
    answered, refused = await spans(env, otlp, 2)
    assert answered.attributes["sidecar.policy"] == "user"  # the identity's own
    assert refused.attributes["enduser.id"] == "tenant-user-2"
    assert refused.attributes["sidecar.policy"] == "tenant"  # the one that refused
    assert refused.attributes["sidecar.limit.identity"] == "tenant"
    assert "sidecar.limit.identity" not in answered.attributes


async def test_a_hook_report_is_a_span_from_authorize_to_report(
    otlp: OtlpReceiver, make_env: MakeEnv
) -> None:
    env = await make_env(telemetry=telemetry(otlp))
    authorized = await env.api.post(
        "/hooks/authorize",
        json={"model": "gpt-4o", "identity": {"id": "hooked"}},
        headers={**HOOK, **CALLER},
    )
    request_id = authorized.json()["request_id"]
    report = {
        "request_id": request_id,
        "identity": "hooked",
        "model": "gpt-4o-2024-08-06",
        "status": 200,
        "usage": {"prompt_tokens": 40, "completion_tokens": 2},
        "source": "body",
        "path": "/v1/chat/completions",
    }
    for _ in range(2):  # a retried report is one request: one span
        r = await env.api.post("/hooks/usage", json=report, headers={**HOOK, **CALLER})
        assert r.status_code == 202, r.text
    [span] = await spans(env, otlp, 1)
    assert span.kind == INTERNAL
    assert (span.trace_id, span.parent_span_id) == (TRACE, PARENT)
    assert span.start_ns == ULID.from_str(request_id).milliseconds * 1_000_000
    assert span.start_ns <= span.end_ns
    assert span.name == "chat gpt-4o-2024-08-06"
    assert span.attributes["sidecar.request_id"] == request_id
    assert span.attributes["gen_ai.usage.input_tokens"] == 40
    assert span.attributes["gen_ai.usage.output_tokens"] == 2
    assert span.attributes["enduser.id"] == "hooked"
    assert span.attributes["sidecar.identity.source"] == "body"
    failed = {**report, "request_id": "proxy-own-id-1", "status": 503}
    r = await env.api.post("/hooks/usage", json=failed, headers=HOOK)
    assert r.status_code == 202
    [_, span] = await spans(env, otlp, 2)
    assert span.status_code == ERROR and span.attributes["error.type"] == "503"
    assert span.parent_span_id == ""
    assert span.end_ns - span.start_ns < 1_000_000_000  # not a ULID: from the report's arrival


async def test_sampled_out_requests_still_carry_the_trace_upstream(
    otlp: OtlpReceiver, make_env: MakeEnv
) -> None:
    env = await make_env(telemetry=telemetry(otlp, sample_ratio=0.0))
    async with client(env) as oai:
        await oai.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        _, trace_id, span_id, flags = upstream_traceparent(env)
        await oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_headers=CALLER)
    assert not int(flags, 16) & 1
    # Only the request of a sampled caller is recorded.
    [span] = await spans(env, otlp, 1)
    assert span.parent_span_id == PARENT
    assert span.trace_id != trace_id and span.span_id != span_id


async def test_without_telemetry_the_callers_trace_context_goes_upstream_untouched(
    env: Env,
) -> None:
    assert env.app.services.tracer is None
    async with client(env) as oai:
        await oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_headers=CALLER)
    forwarded = env.mock.requests[-1]
    assert forwarded.header("traceparent") == CALLER["traceparent"]
    assert forwarded.header("tracestate") == CALLER["tracestate"]
    assert "sidecar_spans_dropped" not in (await env.api.get("/metrics")).text
