from __future__ import annotations

import json
import time
from decimal import Decimal

import aiohttp
import anthropic
import httpx2
import openai
import pytest

from sidecar.mock import MockOptions, start_mock


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, openai.BadRequestError),
        (401, openai.AuthenticationError),
        (404, openai.NotFoundError),
        (429, openai.RateLimitError),
        (500, openai.InternalServerError),
        (503, openai.InternalServerError),
    ],
)
async def test_openai_status_header_raises_the_matching_error(
    oai: openai.AsyncOpenAI, status: int, error: type[openai.APIStatusError]
) -> None:
    with pytest.raises(error) as caught:
        await oai.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"x-mock-status": str(status)},
        )
    assert caught.value.status_code == status
    body = caught.value.body
    assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}
    if status == 429:
        assert caught.value.response.headers["retry-after"] == "1"


@pytest.mark.parametrize(
    ("status", "error", "kind"),
    [
        (400, anthropic.BadRequestError, "invalid_request_error"),
        (429, anthropic.RateLimitError, "rate_limit_error"),
        (500, anthropic.InternalServerError, "api_error"),
        (529, anthropic.OverloadedError, "overloaded_error"),
    ],
)
async def test_anthropic_status_header_raises_the_matching_error(
    claude: anthropic.AsyncAnthropic, status: int, error: type[anthropic.APIStatusError], kind: str
) -> None:
    with pytest.raises(error) as caught:
        await claude.messages.create(
            model="c",
            max_tokens=5,
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"x-mock-status": str(status)},
        )
    body = caught.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == kind


async def test_status_header_on_a_stream_fails_before_streaming(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.RateLimitError):
        await oai.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "x"}],
            stream=True,
            extra_headers={"x-mock-status": "429"},
        )


async def test_control_header_names_are_case_insensitive(oai: openai.AsyncOpenAI) -> None:
    completion = await oai.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "x"}],
        extra_headers={"X-Mock-Output-Tokens": "3"},
    )
    assert completion.usage is not None and completion.usage.completion_tokens == 3


async def test_invalid_control_header_is_a_400(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="x-mock-output-tokens"):
        await oai.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"x-mock-output-tokens": "many"},
        )


async def test_cost_headers(oai: openai.AsyncOpenAI) -> None:
    raw = await oai.chat.completions.with_raw_response.create(
        model="m",
        messages=[{"role": "user", "content": "x"}],
        extra_headers={"x-mock-cost": "0.000123", "x-mock-response-cost": "0.5"},
    )
    assert raw.headers["x-litellm-response-cost"] == "0.5"
    completion = raw.parse()
    assert completion.usage is not None
    assert (completion.usage.model_extra or {})["cost"] == 0.000123


async def test_cost_option_prices_openai_usage() -> None:
    server = await start_mock(options=MockOptions(cost=True, input_tokens=1000, output_tokens=10))
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(server.url + "/v1/chat/completions", json={"model": "m"}) as resp,
        ):
            text = await resp.text()
    finally:
        await server.close()
    usage = json.loads(text, parse_float=Decimal)["usage"]
    assert usage["prompt_tokens"] == 1000 and usage["completion_tokens"] == 10
    assert usage["cost"] == Decimal("0.001020")


async def test_latency_header_delays_the_answer(oai: openai.AsyncOpenAI) -> None:
    started = time.monotonic()
    await oai.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "x"}],
        extra_headers={"x-mock-latency-ms": "150"},
    )
    assert time.monotonic() - started >= 0.15


async def test_chunk_delay_paces_the_stream(oai: openai.AsyncOpenAI) -> None:
    started = time.monotonic()
    stream = await oai.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "x"}],
        stream=True,
        extra_headers={"x-mock-chunks": "4", "x-mock-chunk-delay-ms": "40"},
    )
    chunks = [chunk async for chunk in stream]
    assert len(chunks) == 6
    assert time.monotonic() - started >= 0.16


async def test_fail_rate_answers_500() -> None:
    server = await start_mock(options=MockOptions(fail_rate=1.0, seed=1))
    try:
        async with openai.AsyncOpenAI(
            base_url=server.url + "/v1", api_key="x", max_retries=0
        ) as client:
            with pytest.raises(openai.InternalServerError):
                await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "x"}]
                )
    finally:
        await server.close()


async def test_drop_after_kills_an_openai_stream(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "x"}],
        stream=True,
        extra_headers={"x-mock-drop-after": "2"},
    )
    seen: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        async for chunk in stream:
            seen.append(chunk.choices[0].delta.content or "")
    assert "".join(seen) == "Hello from"


async def test_drop_after_kills_an_anthropic_stream_mid_way(
    claude: anthropic.AsyncAnthropic,
) -> None:
    seen: list[str] = []
    # anthropic 2.x reports the broken connection as its own APIConnectionError.
    with pytest.raises((httpx2.RemoteProtocolError, anthropic.APIConnectionError)) as dropped:
        async with claude.messages.stream(
            model="c",
            max_tokens=5,
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"x-mock-drop-after": "1", "x-mock-chunk-delay-ms": "5"},
        ) as stream:
            async for text in stream.text_stream:
                seen.append(text)
    assert seen == ["Hello"]
    cause = (
        dropped.value.__cause__
        if isinstance(dropped.value, anthropic.APIConnectionError)
        else dropped.value
    )
    assert isinstance(cause, httpx2.RemoteProtocolError), "the connection broke mid-stream"


async def test_drop_after_on_json_closes_without_an_answer(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.APIConnectionError):
        await oai.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"x-mock-drop-after": "0"},
        )
