from __future__ import annotations

import ast
import asyncio
import hashlib
import logging
import shutil
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import httpx2
import litellm
import openai
import pytest
from litellm.integrations.custom_logger import CustomLogger
from litellm.litellm_core_utils.logging_worker import GLOBAL_LOGGING_WORKER
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sidecar.integrations import litellm as integration
from sidecar.integrations.litellm import ConfigError, Settings, SidecarCallback
from sidecar.observe.otel import OtelTracer
from sidecar.testing.otlp import OtlpReceiver
from sidecar.testing.redis_server import free_port
from sidecar.testing.serving import serve
from tests.support.auth import ADMIN_TOKEN
from tests.support.env import Env, MakeEnv
from tests.support.litellm_proxy import LiteLLMProxy

# Two warnings raised inside LiteLLM by its pydantic use (pydantic 2.11+): ReadOnly TypedDict
# items, and its streaming code reading `model_fields` and `model_computed_fields` from instances.
# LiteLLM's proxy pipeline in process (its import alone takes seconds): the slow set.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings(
        "ignore:Items? .* on TypedDict class .* `ReadOnly` qualifier:UserWarning"
    ),
    pytest.mark.filterwarnings(
        "ignore:Accessing the 'model_(computed_)?fields' attribute on the instance is deprecated"
        ":pydantic.warnings.PydanticDeprecatedSince211"
    ),
]

HELLO: Any = [{"role": "user", "content": "hello"}]


def tokens(input_tokens: int, output_tokens: int) -> dict[str, str]:
    return {"x-mock-input-tokens": str(input_tokens), "x-mock-output-tokens": str(output_tokens)}


class Witness(CustomLogger):
    """Registered after the callback under test: once it has seen a success event, so has that
    callback (LiteLLM calls them in order), and its report is under way."""

    def __init__(self) -> None:
        super().__init__()
        self.successes = 0
        self._changed = asyncio.Event()

    async def async_log_success_event(
        self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        self.successes += 1
        self._changed.set()

    async def wait(self, successes: int) -> None:
        async with asyncio.timeout(10):
            while self.successes < successes:
                self._changed.clear()
                await self._changed.wait()


class Callback(Protocol):
    """The callback under test: this package's, or the copy LiteLLM loaded from a file."""

    async def flush(self) -> None: ...
    async def aclose(self) -> None: ...


@dataclass
class Lite:
    """A client, LiteLLM's proxy pipeline with the callback registered, and the sidecar."""

    env: Env
    client: openai.AsyncOpenAI
    callback: Callback
    witness: Witness
    app: Any  # LiteLLM's proxy pipeline, as an ASGI app

    async def settle(self, successes: int = 0) -> None:
        await self.witness.wait(successes)
        await self.callback.flush()
        await self.env.settle()

    async def series(self, external_id: str) -> dict[str, Any]:
        r = await self.env.api.get(f"/v2/identities/{external_id}/metrics")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body


LiteFactory = Callable[..., Awaitable[Lite]]


@pytest.fixture
async def make_lite(env: Env) -> AsyncIterator[LiteFactory]:
    """`make_lite(sidecar_url=None, on=env, config=None, **settings)`: LiteLLM in front of `on`'s
    upstream, its callback calling `sidecar_url` (by default `on`'s sidecar); or, given a
    config.yaml, the callback its `litellm_settings` names, loaded as LiteLLM's proxy loads it and
    configured from the environment. One per test."""
    async with AsyncExitStack() as stack:

        async def make(
            sidecar_url: str | None = None,
            on: Env = env,
            config: Path | None = None,
            **settings: Any,
        ) -> Lite:
            proxy = LiteLLMProxy(on.mock.url, dead_url=f"http://127.0.0.1:{free_port()}")
            stack.push_async_callback(GLOBAL_LOGGING_WORKER.stop)
            stack.push_async_callback(proxy.aclose)
            witness = Witness()
            callback: Callback
            if config is None:
                defaults: dict[str, Any] = {"timeout_s": 5.0, "report_backoff_s": 0.01}
                url = sidecar_url or on.url
                callback = SidecarCallback(
                    Settings(url=url, token=ADMIN_TOKEN, **{**defaults, **settings})
                )
                stack.enter_context(proxy.running(callback, witness))
            else:
                stack.enter_context(proxy.running(witness, config_file=config))
                loaded: Any = litellm.callbacks[0]  # the config's, registered before the witness
                callback = loaded
            stack.push_async_callback(callback.aclose)
            http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=proxy.app))
            await stack.enter_async_context(http)
            client = openai.AsyncOpenAI(
                base_url="http://litellm.test/v1",
                api_key="sk-litellm",
                http_client=http,
                max_retries=0,
            )
            return Lite(on, client, callback, witness, proxy.app)

        yield make


@pytest.fixture
async def lite(make_lite: LiteFactory) -> Lite:
    made: Lite = await make_lite()
    return made


async def chat(lite: Lite, model: str = "gpt-4o", **options: Any) -> Any:
    return await lite.client.chat.completions.create(model=model, messages=HELLO, **options)


# -- attribution ---------------------------------------------------------------------------------


async def test_a_body_identity_is_attributed_with_litellms_cost_and_never_reaches_upstream(
    lite: Lite,
) -> None:
    identity = {
        "id": "lite-user",
        "display_name": "Lite User",
        "tags": ["gold"],
        "metadata": [{"plan": "pro"}],
    }
    reply = await chat(
        lite, "house-model", extra_body={"identity": identity}, extra_headers=tokens(120, 30)
    )
    await lite.settle(successes=1)
    assert reply.usage is not None and reply.usage.prompt_tokens == 120
    sent = lite.env.mock.requests[-1].json()
    assert "identity" not in sent and sent["messages"] == HELLO
    record = (await lite.env.api.get("/v2/identities/lite-user")).json()
    assert (record["display_name"], record["tags"], record["metadata"]) == (
        "Lite User",
        ["gold"],
        {"plan": "pro"},
    )
    metrics = await lite.env.metrics("lite-user")
    assert (metrics["total_requests"], metrics["input_tokens"], metrics["output_tokens"]) == (
        1,
        120,
        30,
    )
    # LiteLLM's price for this model (0.001 and 0.002 USD a token); the sidecar has none.
    assert metrics["total_cost"] == pytest.approx(120 * 0.001 + 30 * 0.002)
    assert (await lite.series("lite-user"))["series"]["by_source"]["body"] == 1


@pytest.mark.parametrize(
    ("field", "sent_rest"),
    [
        ({"orq": {"identity": {"id": "aliased"}, "trace": "t-1"}}, {"orq": {"trace": "t-1"}}),
        ({"orq": {"identity": {"id": "aliased"}}}, {}),
        ({"contact": {"id": "aliased"}}, {}),
    ],
)
async def test_the_identity_aliases_are_read_and_removed(
    lite: Lite, field: dict[str, Any], sent_rest: dict[str, Any]
) -> None:
    await chat(lite, extra_body=field, extra_headers=tokens(5, 1))
    await lite.settle(successes=1)
    sent = lite.env.mock.requests[-1].json()
    assert {k: sent[k] for k in ("orq", "contact") if k in sent} == sent_rest
    assert (await lite.env.metrics("aliased"))["input_tokens"] == 5


async def test_the_identity_header_is_attributed_and_a_client_cannot_forge_the_hook_token(
    lite: Lite,
) -> None:
    headers = {"X-ORQ-IDENTITY-ID": "by-header", "x-sidecar-token": "forged", **tokens(9, 4)}
    await chat(lite, extra_headers=headers)
    await lite.settle(successes=1)
    metrics = await lite.env.metrics("by-header")
    assert (metrics["total_requests"], metrics["input_tokens"], metrics["output_tokens"]) == (
        1,
        9,
        4,
    )
    assert (await lite.series("by-header"))["series"]["last_source"] == "header"


async def test_the_owner_of_the_clients_key_is_attributed(
    make_env: MakeEnv, make_lite: LiteFactory
) -> None:
    # LiteLLM keeps the client's key out of the headers it logs; the callback still passes it on.
    digest = hashlib.sha256(b"sk-litellm").hexdigest()
    keyed = await make_env(api_keys=[{"sha256": digest, "owner": "key-owner"}])
    lite = await make_lite(on=keyed)
    await chat(lite, extra_headers=tokens(11, 2))
    await lite.settle(successes=1)
    assert (await lite.env.metrics("key-owner"))["input_tokens"] == 11
    assert (await lite.series("key-owner"))["series"]["by_source"]["api_key"] == 1


async def test_a_stream_is_counted_from_the_assembled_response(lite: Lite) -> None:
    stream = await chat(
        lite, stream=True, extra_body={"identity": {"id": "streamer"}}, extra_headers=tokens(70, 20)
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    await lite.settle(successes=1)
    assert text
    assert "identity" not in lite.env.mock.requests[-1].json()
    metrics = await lite.env.metrics("streamer")
    assert (metrics["total_requests"], metrics["input_tokens"], metrics["output_tokens"]) == (
        1,
        70,
        20,
    )


async def test_an_anthropic_messages_call_keeps_the_clients_metadata_and_is_counted(
    lite: Lite,
) -> None:
    # On /v1/messages LiteLLM keeps its own metadata apart (`litellm_metadata`): the client's
    # `metadata` is Anthropic's field and goes upstream untouched.
    body = {
        "model": "claude",
        "max_tokens": 64,
        "messages": HELLO,
        "metadata": {"user_id": "end-user-7"},
        "identity": {"id": "anthropic-user"},
    }
    headers = {"x-api-key": "sk-litellm", "anthropic-version": "2023-06-01", **tokens(33, 12)}
    transport = httpx.ASGITransport(app=lite.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://litellm.test") as http:
        r = await http.post("/v1/messages", json=body, headers=headers)
    assert r.status_code == 200, r.text
    await lite.settle(successes=1)
    assert r.json()["usage"]["input_tokens"] == 33
    sent = lite.env.mock.requests[-1]
    assert sent.path.endswith("/messages")
    assert "identity" not in sent.json() and sent.json()["metadata"] == {"user_id": "end-user-7"}
    metrics = await lite.env.metrics("anthropic-user")
    assert (metrics["total_requests"], metrics["input_tokens"], metrics["output_tokens"]) == (
        1,
        33,
        12,
    )


# -- failures ------------------------------------------------------------------------------------


async def test_an_upstream_failure_is_reported_as_an_error(lite: Lite) -> None:
    with pytest.raises(openai.InternalServerError):
        await chat(
            lite, extra_body={"identity": {"id": "unlucky"}}, extra_headers={"x-mock-status": "500"}
        )
    await lite.settle()
    metrics = await lite.env.metrics("unlucky")
    assert (metrics["total_requests"], metrics["error_rate"]) == (1, 1.0)


async def test_the_clients_trace_context_reaches_the_sidecars_span(
    otlp: OtlpReceiver, make_env: MakeEnv, make_lite: LiteFactory
) -> None:
    on = await make_env(telemetry={"enabled": True, "endpoint": otlp.url + "/v1/traces"})
    lite = await make_lite(on=on)
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    caller = {"traceparent": f"00-{trace_id}-{parent}-01", "tracestate": "congo=t61rcWkgMzE"}
    await chat(
        lite, extra_body={"identity": {"id": "traced"}}, extra_headers={**caller, **tokens(5, 2)}
    )
    with pytest.raises(openai.InternalServerError):
        await chat(lite, extra_headers={**caller, "x-mock-status": "500"})
    await lite.settle(successes=1)
    tracer = on.app.services.tracer
    assert isinstance(tracer, OtelTracer)
    answered, failed = sorted(await otlp.collect(tracer.flush, 2), key=lambda s: s.status_code)
    for span in (answered, failed):
        assert (span.trace_id, span.parent_span_id, span.trace_state) == (
            trace_id,
            parent,
            caller["tracestate"],
        )
    assert answered.attributes["enduser.id"] == "traced"
    assert answered.attributes["gen_ai.usage.input_tokens"] == 5
    assert failed.attributes["error.type"] == "500"


async def test_a_failed_attempt_that_litellm_recovers_from_is_counted_as_the_success(
    lite: Lite,
) -> None:
    # `flaky` cannot connect and falls back to gpt-4o: LiteLLM logs a failure event for the first
    # attempt, then the success. The sidecar counts a request_id once, so only the final outcome
    # may be reported.
    reply = await chat(
        lite, "flaky", extra_body={"identity": {"id": "recovered"}}, extra_headers=tokens(8, 2)
    )
    await lite.settle(successes=1)
    assert reply.usage is not None and reply.usage.prompt_tokens == 8
    metrics = await lite.env.metrics("recovered")
    assert (metrics["total_requests"], metrics["error_rate"], metrics["input_tokens"]) == (
        1,
        0.0,
        8,
    )


async def test_an_invalid_identity_is_the_clients_400_and_nothing_is_sent_or_written(
    lite: Lite, redis: Redis
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        await chat(lite, extra_body={"identity": {"id": "x", "tags": "gold"}})
    await lite.settle()
    assert refused.value.status_code == 400
    error = refused.value.body
    assert isinstance(error, dict) and "identity.tags" in error["message"]
    assert error["param"] == "identity.tags" and error["type"] == "invalid_request_error"
    assert len(lite.env.mock.requests) == 0
    assert await redis.dbsize() == 0


async def test_a_missing_identity_is_a_401_when_one_is_required(
    make_env: MakeEnv, make_lite: LiteFactory
) -> None:
    strict = await make_env(identity={"required": True})
    lite = await make_lite(on=strict)
    with pytest.raises(openai.AuthenticationError) as refused:
        await chat(lite)
    assert refused.value.status_code == 401
    assert len(lite.env.mock.requests) == 0


async def test_the_sidecars_limits_reach_the_client_429_and_retry_after_included(
    make_env: MakeEnv, make_lite: LiteFactory, tmp_path: Path
) -> None:
    policies = tmp_path / "policies.toml"
    policies.write_text('[[policy]]\nname = "tight"\nrequests = ["1/minute"]\n')
    limited = await make_env(policies={"paths": [str(policies)]})
    lite = await make_lite(on=limited)
    first = await lite.client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=HELLO, extra_headers={"X-ORQ-IDENTITY-ID": "u1", **tokens(3, 1)}
    )
    # The sidecar's rate-limit headers ride on LiteLLM's answer.
    assert first.headers["x-ratelimit-limit-requests"] == "1"
    assert first.headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(openai.RateLimitError) as refused:
        await chat(lite, extra_headers={"X-ORQ-IDENTITY-ID": "u1"})
    await lite.settle(successes=1)
    assert refused.value.status_code == 429
    assert int(refused.value.response.headers["retry-after"]) >= 1
    assert refused.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    body = refused.value.body
    assert isinstance(body, dict) and body["type"] == "rate_limit_error"
    assert body["message"].startswith("Rate limit exceeded: 1 requests per minute for identity u1")
    assert len(lite.env.mock.requests) == 1
    metrics = await limited.metrics("u1")
    assert (metrics["total_requests"], metrics["rate_limited_requests"]) == (1, 1)


async def test_a_token_limited_request_without_a_cap_is_given_the_one_it_was_reserved_for(
    make_env: MakeEnv, make_lite: LiteFactory, tmp_path: Path
) -> None:
    """As inline (`[limits] cap_output`): the callback sets the output cap the sidecar reserved
    for, so that the reservation is an upper bound; a request's own cap is left as it is."""
    policies = tmp_path / "policies.toml"
    policies.write_text('[[policy]]\nname = "metered"\ntokens = ["1000000/minute"]\n')
    limited = await make_env(
        policies={"paths": [str(policies)]}, limits={"default_output_reserve": 300}
    )
    lite = await make_lite(on=limited)
    who = {"X-ORQ-IDENTITY-ID": "capped", **tokens(3, 1)}
    await lite.client.chat.completions.create(model="gpt-4o", messages=HELLO, extra_headers=who)
    await lite.client.chat.completions.create(
        model="gpt-4o", messages=HELLO, max_tokens=7, extra_headers=who
    )
    await lite.settle(successes=2)
    uncapped, own = (request.json() for request in lite.env.mock.requests)
    assert uncapped["max_tokens"] == 300
    assert own["max_tokens"] == 7


@pytest.mark.parametrize(
    ("url", "call_type", "data", "set_as"),
    [
        ("http://x/v1/chat/completions", "acompletion", {}, "max_tokens"),
        ("http://x/v1/responses", "aresponses", {}, "max_output_tokens"),
        (None, "aresponses", {}, "max_output_tokens"),
        ("http://x/v1/embeddings", "aembedding", {}, None),  # no output to cap
        (None, "aembedding", {}, None),
        ("http://x/v1/chat/completions", "acompletion", {"max_completion_tokens": 5}, None),
    ],
)
def test_the_output_cap_goes_where_the_api_reads_it(
    url: str | None, call_type: str, data: dict[str, Any], set_as: str | None
) -> None:
    request: dict[str, Any] = {"model": "m", **data}
    if url is not None:
        request["proxy_server_request"] = {"url": url}
    before = dict(request)
    integration.cap_output(request, call_type, httpx.Response(200, json={"output_cap": 300}))
    added = {k: v for k, v in request.items() if k not in before}
    assert added == ({} if set_as is None else {set_as: 300})
    # An answer that names no cap, or not a number, changes nothing.
    for answer in ({"output_cap": None}, {"output_cap": "300"}, {}):
        again = dict(before)
        integration.cap_output(again, call_type, httpx.Response(200, json=answer))
        assert again == before


# -- the sidecar unavailable -------------------------------------------------------------------


async def test_an_unreachable_sidecar_fails_open_with_one_warning(
    make_lite: LiteFactory, caplog: pytest.LogCaptureFixture
) -> None:
    lite = await make_lite(sidecar_url=f"http://127.0.0.1:{free_port()}")
    with caplog.at_level(logging.WARNING, logger="sidecar.integrations.litellm"):
        for _ in range(2):
            await chat(lite, extra_body={"identity": {"id": "unseen"}})
        await lite.settle(successes=2)
    ours = [r.getMessage() for r in caplog.records if r.name == "sidecar.integrations.litellm"]
    # One line per outage, not per request; and no usage report was attempted.
    assert len(ours) == 1 and "let through unattributed" in ours[0], ours
    assert "identity" not in lite.env.mock.requests[-1].json()
    assert (await lite.env.api.get("/v2/identities/unseen")).status_code == 404


async def test_a_slow_sidecar_fails_open_within_the_timeout(make_lite: LiteFactory) -> None:
    released = asyncio.Event()

    async def stall(_: Request) -> Response:
        await released.wait()
        return JSONResponse({})

    async with serve(Starlette(routes=[Route("/hooks/authorize", stall, methods=["POST"])])) as url:
        lite = await make_lite(sidecar_url=url, timeout_s=0.1)
        started = time.perf_counter()
        try:
            await chat(lite)
            assert time.perf_counter() - started < 1.0
        finally:
            released.set()


def policy_file(tmp_path: Path, *lines: str) -> dict[str, list[str]]:
    path = tmp_path / "policies.toml"
    path.write_text("\n".join(["[[policy]]", 'name = "tight"', *lines, ""]))
    return {"paths": [str(path)]}


class Hop:
    """A hop in front of the sidecar's hooks that keeps the sidecar's answers to authorize; with
    `hold_first`, the first authorize waits there until `release` is set."""

    def __init__(self, sidecar: httpx.AsyncClient, *, hold_first: bool) -> None:
        self.sidecar = sidecar
        self.hold_first = hold_first
        self.release = asyncio.Event()
        self.answers: list[httpx.Response] = []
        self._answered = asyncio.Event()
        paths = ("/hooks/authorize", "/hooks/usage")
        self.app = Starlette(
            routes=[Route(path, self._forward, methods=["POST"]) for path in paths]
        )

    async def _forward(self, request: Request) -> Response:
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k not in ("host", "content-length")}
        authorize = request.url.path == "/hooks/authorize"
        if authorize and self.hold_first and not self.release.is_set():
            await self.release.wait()
        answer = await self.sidecar.post(request.url.path, content=body, headers=headers)
        if authorize:
            self.answers.append(answer)
            self._answered.set()
        passed = {k: v for k, v in answer.headers.items() if k not in ("content-length", "date")}
        return Response(answer.content, answer.status_code, passed)

    async def first_answer(self) -> httpx.Response:
        async with asyncio.timeout(10):
            await self._answered.wait()
        return self.answers[0]


async def test_a_decision_reaching_the_sidecar_after_the_callback_gave_up_counts_nothing(
    make_env: MakeEnv, make_lite: LiteFactory, tmp_path: Path
) -> None:
    limited = await make_env(
        policies=policy_file(tmp_path, 'requests = ["2/minute"]', "concurrency = 1")
    )
    async with httpx.AsyncClient(base_url=limited.url) as sidecar:
        hop = Hop(sidecar, hold_first=True)
        async with serve(hop.app) as url:
            lite = await make_lite(sidecar_url=url, on=limited, timeout_s=1.0)
            who = {"X-ORQ-IDENTITY-ID": "late"}
            reply = await chat(lite, extra_headers={**who, **tokens(50, 5)})
            assert reply.choices[0].message.content  # let through: SIDECAR_FAIL_OPEN
            hop.release.set()
            late = await hop.first_answer()
            assert (late.status_code, late.json()["error"]["code"]) == (504, "deadline_exceeded")
            # Unattributed: the identity was never written, its limits never touched.
            assert (await limited.api.get("/v2/identities/late")).status_code == 404
            # The concurrency slot is free, and both requests of the minute are left.
            second = await lite.client.chat.completions.with_raw_response.create(
                model="gpt-4o", messages=HELLO, extra_headers={**who, **tokens(7, 1)}
            )
            assert second.headers["x-ratelimit-remaining-requests"] == "1"
            await lite.settle(successes=2)
    metrics = await limited.metrics("late")
    assert (metrics["total_requests"], metrics["input_tokens"]) == (1, 7)
    assert len(limited.mock.requests) == 2


async def test_a_decision_made_after_the_callback_gave_up_gives_its_concurrency_slot_back(
    make_env: MakeEnv, make_lite: LiteFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    limited = await make_env(
        policies=policy_file(tmp_path, 'requests = ["2/minute"]', "concurrency = 1")
    )
    limiter = limited.app.services.limiter
    admit = limiter.admit
    slowed, gave_up = asyncio.Event(), asyncio.Event()

    async def slow_admit(*args: Any) -> Any:
        # Redis answers the first limit check only after the callback has stopped waiting.
        decision = await admit(*args)
        if not slowed.is_set():
            slowed.set()
            await gave_up.wait()
        return decision

    monkeypatch.setattr(limiter, "admit", slow_admit)
    async with httpx.AsyncClient(base_url=limited.url) as sidecar:
        hop = Hop(sidecar, hold_first=False)
        async with serve(hop.app) as url:
            lite = await make_lite(sidecar_url=url, on=limited, timeout_s=1.0)
            who = {"X-ORQ-IDENTITY-ID": "late"}
            await chat(lite, extra_headers={**who, **tokens(50, 5)})
            gave_up.set()
            late = await hop.first_answer()
            assert (late.status_code, late.json()["error"]["code"]) == (504, "deadline_exceeded")
            # The concurrency slot is free again; the request the check counted stays counted.
            second = await lite.client.chat.completions.with_raw_response.create(
                model="gpt-4o", messages=HELLO, extra_headers={**who, **tokens(7, 1)}
            )
            assert second.headers["x-ratelimit-remaining-requests"] == "0"
            await lite.settle(successes=2)
    metrics = await limited.metrics("late")
    assert (metrics["total_requests"], metrics["input_tokens"]) == (1, 7)


async def test_an_unreachable_sidecar_fails_closed_when_told_to(make_lite: LiteFactory) -> None:
    lite = await make_lite(sidecar_url=f"http://127.0.0.1:{free_port()}", fail_open=False)
    with pytest.raises(openai.InternalServerError) as refused:
        await chat(lite)
    assert refused.value.status_code == 503
    assert len(lite.env.mock.requests) == 0


# -- usage reports -------------------------------------------------------------------------------


async def test_a_lost_report_answer_is_retried_and_counted_once(
    env: Env, make_lite: LiteFactory
) -> None:
    # A relay in front of the sidecar delivers the first usage report but loses the answer.
    usage_posts: list[bytes] = []

    async with httpx.AsyncClient(base_url=env.url) as upstream:

        async def relay(request: Request) -> Response:
            body = await request.body()
            headers = {
                k: v for k, v in request.headers.items() if k not in ("host", "content-length")
            }
            answer = await upstream.post(request.url.path, content=body, headers=headers)
            if request.url.path == "/hooks/usage":
                usage_posts.append(body)
                if len(usage_posts) == 1:
                    return Response(status_code=503)
            return Response(answer.content, answer.status_code, media_type="application/json")

        routes = [
            Route(path, relay, methods=["POST"]) for path in ("/hooks/authorize", "/hooks/usage")
        ]
        async with serve(Starlette(routes=routes)) as url:
            lite = await make_lite(sidecar_url=url)
            await chat(
                lite, extra_body={"identity": {"id": "retried"}}, extra_headers=tokens(40, 10)
            )
            await lite.settle(successes=1)
    assert len(usage_posts) == 2 and usage_posts[0] == usage_posts[1]
    metrics = await env.metrics("retried")
    assert (metrics["total_requests"], metrics["input_tokens"], metrics["output_tokens"]) == (
        1,
        40,
        10,
    )


@pytest.mark.parametrize(
    ("path", "call_type", "expected"),
    [
        ("/v1/chat/completions", "acompletion", True),
        ("/chat/completions/", "acompletion", True),
        ("/openai/deployments/gpt-4o/chat/completions", "acompletion", True),
        ("/v1/messages", "anthropic_messages", True),
        ("/v1/responses", "aresponses", True),
        ("/v1/embeddings", "aembedding", True),
        # A stored response read back replays the usage of the call that made it.
        ("/v1/responses/resp_123", "aget_responses", False),
        ("/v1/images/generations", "aimage_generation", False),
        ("/v1/batches", "acreate_batch", False),
        (None, "acompletion", True),
        (None, "aget_responses", False),
    ],
)
def test_only_inference_calls_are_metered(path: str | None, call_type: str, expected: bool) -> None:
    data: dict[str, Any] = {"model": "m", "identity": {"id": "x"}}
    if path is not None:
        data["proxy_server_request"] = {"url": f"http://litellm{path}", "headers": {}}
    assert integration.metered(data, call_type) is expected


# -- configuration -------------------------------------------------------------------------------


async def test_the_module_copied_next_to_config_yaml_loads_as_litellms_proxy_loads_it(
    env: Env, make_lite: LiteFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # LiteLLM executes a callbacks entry's file found beside config.yaml without registering it
    # in sys.modules.
    shutil.copy(integration.__file__, tmp_path / "sidecar_litellm.py")
    config = tmp_path / "config.yaml"
    config.write_text("litellm_settings:\n  callbacks: sidecar_litellm.handler\n")
    monkeypatch.setenv("SIDECAR_URL", env.url)
    monkeypatch.setenv("SIDECAR_HOOK_TOKEN", ADMIN_TOKEN)
    monkeypatch.setenv("SIDECAR_TIMEOUT_MS", "5000")
    lite = await make_lite(config=config)
    assert type(lite.callback).__module__ == "sidecar_litellm"
    assert "sidecar_litellm" not in sys.modules
    await chat(lite, extra_body={"identity": {"id": "from-file"}}, extra_headers=tokens(21, 3))
    await lite.settle(successes=1)
    assert "identity" not in lite.env.mock.requests[-1].json()
    metrics = await env.metrics("from-file")
    assert (metrics["total_requests"], metrics["input_tokens"], metrics["output_tokens"]) == (
        1,
        21,
        3,
    )


def test_the_module_imports_nothing_from_this_package() -> None:
    # Copied on its own next to config.yaml, it has no package around it.
    imported: list[str] = []
    for node in ast.walk(ast.parse(Path(integration.__file__).read_text())):
        if isinstance(node, ast.Import):
            imported += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            imported.append("." * node.level + (node.module or ""))
    assert "httpx" in imported
    assert [name for name in imported if name.startswith((".", "sidecar"))] == []


def test_the_module_handler_is_a_litellm_callback_configured_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert isinstance(integration.handler, CustomLogger)
    monkeypatch.setenv("SIDECAR_URL", "http://sidecar:8080/")
    monkeypatch.setenv("SIDECAR_HOOK_TOKEN", "hook-token")
    monkeypatch.setenv("SIDECAR_TIMEOUT_MS", "350")
    monkeypatch.setenv("SIDECAR_FAIL_OPEN", "false")
    assert SidecarCallback().settings == Settings(
        url="http://sidecar:8080", token="hook-token", timeout_s=0.35, fail_open=False
    )
    defaults = Settings.from_env({"SIDECAR_URL": "https://s", "SIDECAR_HOOK_TOKEN": "t"})
    assert (defaults.timeout_s, defaults.fail_open) == (0.2, True)


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({}, "SIDECAR_URL and SIDECAR_HOOK_TOKEN"),
        ({"SIDECAR_URL": "http://s"}, "SIDECAR_HOOK_TOKEN"),
        ({"SIDECAR_URL": "sidecar:8080", "SIDECAR_HOOK_TOKEN": "t"}, "SIDECAR_URL"),
        (
            {"SIDECAR_URL": "http://s", "SIDECAR_HOOK_TOKEN": "t", "SIDECAR_TIMEOUT_MS": "0"},
            "SIDECAR_TIMEOUT_MS",
        ),
        (
            {"SIDECAR_URL": "http://s", "SIDECAR_HOOK_TOKEN": "t", "SIDECAR_TIMEOUT_MS": "fast"},
            "SIDECAR_TIMEOUT_MS",
        ),
        (
            {"SIDECAR_URL": "http://s", "SIDECAR_HOOK_TOKEN": "t", "SIDECAR_FAIL_OPEN": "maybe"},
            "SIDECAR_FAIL_OPEN",
        ),
    ],
)
def test_a_bad_environment_names_the_variable(environ: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        Settings.from_env(environ)


def test_the_callback_passes_the_output_caps_through_for_the_reservation() -> None:
    from sidecar.integrations.litellm import client_body

    data = {
        "model": "gpt-4o",
        "messages": [],
        "max_tokens": 64,
        "max_completion_tokens": 32,
        "metadata": {"user_api_key": "x"},
        "litellm_call_id": "abc",
        "proxy_server_request": {},
    }
    assert client_body(data) == {
        "model": "gpt-4o",
        "messages": [],
        "max_tokens": 64,
        "max_completion_tokens": 32,
    }
