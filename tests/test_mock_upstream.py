from __future__ import annotations

import argparse
import asyncio
import base64
import json
import re
import signal
import struct
import sys
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import aiohttp
import anthropic
import httpx2
import openai
import pytest

from sidecar.mock import MockOptions, MockServer, add_arguments, start_mock

TEXT = "Hello from the mock upstream"


@pytest.fixture
async def mock(caplog: pytest.LogCaptureFixture) -> AsyncIterator[MockServer]:
    server = await start_mock()
    yield server
    await server.close()
    # Disconnects, drops and shutdown must not leave errors in the event loop's log.
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


@pytest.fixture
async def oai(mock: MockServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=mock.url + "/v1", api_key="x", max_retries=0) as client:
        yield client


@pytest.fixture
async def claude(mock: MockServer) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(base_url=mock.url, api_key="x", max_retries=0) as client:
        yield client


@pytest.fixture
async def http(mock: MockServer) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(mock.url) as session:
        yield session


async def exchange(mock: MockServer, data: bytes) -> bytes:
    """Send raw bytes, return everything read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", mock.port)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()


USAGE_HEADERS = {
    "x-mock-input-tokens": "100",
    "x-mock-output-tokens": "20",
    "x-mock-cached-tokens": "40",
    "x-mock-reasoning-tokens": "5",
}


# -- OpenAI chat completions ---------------------------------------------------------------------


async def test_chat_completion_usage_follows_control_headers(
    oai: openai.AsyncOpenAI, mock: MockServer
) -> None:
    completion = await oai.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], extra_headers=USAGE_HEADERS
    )
    assert completion.object == "chat.completion"
    assert completion.model == "gpt-4o"
    assert completion.choices[0].message.content == TEXT
    assert completion.choices[0].finish_reason == "stop"
    usage = completion.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (100, 20, 120)
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 40  # included in prompt_tokens
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 5
    assert "cost" not in (usage.model_extra or {})


async def test_chat_completion_default_usage_is_derived_from_the_request(
    oai: openai.AsyncOpenAI, mock: MockServer
) -> None:
    first = await oai.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}]
    )
    body = mock.requests[-1].body
    assert first.usage is not None
    assert first.usage.prompt_tokens == len(body) // 4
    assert first.usage.completion_tokens == 16
    capped = await oai.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}], max_tokens=500
    )
    assert capped.usage is not None and capped.usage.completion_tokens == 64
    small = await oai.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}], max_completion_tokens=7
    )
    assert small.usage is not None and small.usage.completion_tokens == 7


async def test_chat_stream_without_include_usage_has_no_usage(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_headers={"x-mock-chunks": "3"},
    )
    chunks = [chunk async for chunk in stream]
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert all(chunk.usage is None for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello from the"
    assert len(chunks) == 1 + 3 + 1


async def test_chat_stream_with_include_usage_ends_with_a_usage_chunk(
    oai: openai.AsyncOpenAI,
) -> None:
    stream = await oai.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=USAGE_HEADERS,
    )
    chunks = [chunk async for chunk in stream]
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (100, 20)
    assert last.usage.prompt_tokens_details is not None
    assert last.usage.prompt_tokens_details.cached_tokens == 40
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == TEXT


# -- legacy completions, responses, embeddings, models -------------------------------------------


async def test_legacy_completions_json_and_stream(oai: openai.AsyncOpenAI) -> None:
    completion = await oai.completions.create(
        model="gpt-3.5-turbo-instruct", prompt="Say hi", extra_headers=USAGE_HEADERS
    )
    assert completion.object == "text_completion"
    assert completion.choices[0].text == TEXT
    assert completion.usage is not None and completion.usage.total_tokens == 120
    stream = await oai.completions.create(
        model="gpt-3.5-turbo-instruct",
        prompt="Say hi",
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-mock-output-tokens": "9"},
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == TEXT
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 9


async def test_responses_json(oai: openai.AsyncOpenAI) -> None:
    response = await oai.responses.create(
        model="gpt-4.1", input="hi", instructions="be brief", extra_headers=USAGE_HEADERS
    )
    assert response.object == "response"
    assert response.status == "completed"
    assert response.output_text == TEXT
    assert response.instructions == "be brief"
    usage = response.usage
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (100, 20, 120)
    assert usage.input_tokens_details.cached_tokens == 40
    assert usage.output_tokens_details.reasoning_tokens == 5


async def test_responses_stream_sends_the_real_event_sequence(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.responses.create(
        model="gpt-4.1", input="hi", stream=True, extra_headers={"x-mock-chunks": "2"}
    )
    events = [event async for event in stream]
    assert [event.type for event in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    created, completed = events[0], events[-1]
    assert created.type == "response.created" and created.response.usage is None
    assert completed.type == "response.completed" and completed.response.usage is not None


async def test_responses_stream_helper_accumulates_the_final_response(
    oai: openai.AsyncOpenAI,
) -> None:
    async with oai.responses.stream(
        model="gpt-4.1", input="hi", extra_headers=USAGE_HEADERS
    ) as stream:
        deltas = [
            event.delta async for event in stream if event.type == "response.output_text.delta"
        ]
        final = await stream.get_final_response()
    assert "".join(deltas) == TEXT
    assert final.output_text == TEXT
    assert final.usage is not None and final.usage.input_tokens == 100


async def test_embeddings_float_and_base64_agree(oai: openai.AsyncOpenAI, mock: MockServer) -> None:
    # The SDK asks for base64 unless told otherwise and decodes it.
    decoded = await oai.embeddings.create(model="text-embedding-3-small", input=["a", "b", "c"])
    assert mock.requests[-1].json()["encoding_format"] == "base64"
    plain = await oai.embeddings.create(
        model="text-embedding-3-small", input=["a", "b", "c"], encoding_format="float"
    )
    assert [item.index for item in plain.data] == [0, 1, 2]
    assert all(len(item.embedding) == 8 for item in plain.data)
    assert [item.embedding for item in decoded.data] == [item.embedding for item in plain.data]
    assert plain.data[0].embedding != plain.data[1].embedding
    assert plain.usage.prompt_tokens == plain.usage.total_tokens > 0
    single = await oai.embeddings.create(
        model="e",
        input="one",
        dimensions=3,
        encoding_format="float",
        extra_headers={"x-mock-input-tokens": "12"},
    )
    assert len(single.data) == 1 and len(single.data[0].embedding) == 3
    assert single.usage.prompt_tokens == 12


async def test_embeddings_base64_is_little_endian_float32(http: aiohttp.ClientSession) -> None:
    async with http.post(
        "/v1/embeddings", json={"model": "e", "input": "x", "encoding_format": "base64"}
    ) as resp:
        data = await resp.json()
    raw = base64.b64decode(data["data"][0]["embedding"])
    assert len(struct.unpack("<8f", raw)) == 8


async def test_embeddings_reject_an_unknown_encoding_format(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        await oai.embeddings.create(model="e", input="x", extra_body={"encoding_format": "hex"})


async def test_models_list(oai: openai.AsyncOpenAI, claude: anthropic.AsyncAnthropic) -> None:
    models = [model.id async for model in oai.models.list()]
    assert "gpt-4o-mini" in models
    claude_models = [model.id async for model in claude.models.list()]
    assert claude_models and all(name.startswith("claude") for name in claude_models)


# -- Anthropic messages --------------------------------------------------------------------------

ANTHROPIC_HEADERS = {
    "x-mock-input-tokens": "100",
    "x-mock-output-tokens": "20",
    "x-mock-cached-tokens": "40",
    "x-mock-cache-write-tokens": "10",
}


async def test_anthropic_message_usage_keeps_cache_apart(claude: anthropic.AsyncAnthropic) -> None:
    message = await claude.messages.create(
        model="claude-sonnet-4-20250514",
        max_tokens=100,
        messages=[{"role": "user", "content": "hi"}],
        extra_headers=ANTHROPIC_HEADERS,
    )
    assert message.type == "message"
    assert message.model == "claude-sonnet-4-20250514"
    assert message.stop_reason == "end_turn"
    assert message.content[0].type == "text" and message.content[0].text == TEXT
    usage = message.usage
    # x-mock-input-tokens is the whole prompt; Anthropic reports cache reads and writes apart.
    assert usage.input_tokens == 100 - 40 - 10
    assert usage.cache_read_input_tokens == 40
    assert usage.cache_creation_input_tokens == 10
    assert usage.output_tokens == 20


async def test_anthropic_stream_sends_the_real_event_sequence(
    claude: anthropic.AsyncAnthropic,
) -> None:
    stream = await claude.messages.create(
        model="claude-sonnet-4-20250514",
        max_tokens=100,
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_headers={**ANTHROPIC_HEADERS, "x-mock-chunks": "2"},
    )
    events = [event async for event in stream]
    assert [event.type for event in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]  # the SDK swallows "ping"
    start, delta = events[0], events[5]
    assert start.type == "message_start"
    assert start.message.usage.output_tokens == 1
    assert start.message.usage.input_tokens == 50
    assert start.message.usage.cache_read_input_tokens == 40
    assert delta.type == "message_delta"
    assert delta.usage.output_tokens == 20
    assert delta.delta.stop_reason == "end_turn"


async def test_anthropic_stream_helper_accumulates_the_final_message(
    claude: anthropic.AsyncAnthropic,
) -> None:
    async with claude.messages.stream(
        model="claude-sonnet-4-20250514",
        max_tokens=100,
        messages=[{"role": "user", "content": "hi"}],
        extra_headers=ANTHROPIC_HEADERS,
    ) as stream:
        text = "".join([chunk async for chunk in stream.text_stream])
        final = await stream.get_final_message()
    assert text == TEXT
    assert final.usage.output_tokens == 20
    assert final.usage.input_tokens == 50
    assert final.usage.cache_creation_input_tokens == 10


async def test_anthropic_count_tokens(claude: anthropic.AsyncAnthropic) -> None:
    count = await claude.messages.count_tokens(
        model="claude-sonnet-4-20250514",
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-mock-input-tokens": "33"},
    )
    assert count.input_tokens == 33


# -- control headers -----------------------------------------------------------------------------


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
    # Newer anthropic releases wrap the transport's error in their own.
    with pytest.raises((httpx2.RemoteProtocolError, anthropic.APIConnectionError)):
        async with claude.messages.stream(
            model="c",
            max_tokens=5,
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"x-mock-drop-after": "1", "x-mock-chunk-delay-ms": "5"},
        ) as stream:
            async for text in stream.text_stream:
                seen.append(text)
    assert seen == ["Hello"]


async def test_drop_after_on_json_closes_without_an_answer(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.APIConnectionError):
        await oai.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"x-mock-drop-after": "0"},
        )


# -- recording -----------------------------------------------------------------------------------


async def test_requests_are_recorded(oai: openai.AsyncOpenAI, mock: MockServer) -> None:
    await oai.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "x"}],
        extra_headers={"X-ORQ-IDENTITY-ID": "user_1"},
        extra_query={"trace": "1"},
    )
    recorded = mock.requests[-1]
    assert recorded.method == "POST"
    assert recorded.path == "/v1/chat/completions"
    assert recorded.query == "trace=1"
    assert recorded.header("x-orq-identity-id") == "user_1"
    assert ("authorization", "Bearer x") in recorded.headers
    body: dict[str, Any] = recorded.json()
    assert body["model"] == "gpt-4o"
    assert "identity" not in body


async def test_recording_keeps_the_last_thousand(
    http: aiohttp.ClientSession, mock: MockServer
) -> None:
    for index in range(1005):
        async with http.get(f"/v1/models?n={index}") as resp:
            await resp.read()
    assert len(mock.requests) == 1000
    assert mock.requests[0].query == "n=5"
    assert mock.requests[-1].query == "n=1004"


# -- HTTP behaviour ------------------------------------------------------------------------------


async def test_routes_match_by_suffix(http: aiohttp.ClientSession) -> None:
    for prefix in ("/v1", "/openai/v1", "/v3/router", ""):
        async with http.post(prefix + "/chat/completions", json={"model": "m"}) as resp:
            assert resp.status == 200
            assert (await resp.json())["object"] == "chat.completion"


async def test_unknown_route_bad_json_and_wrong_method(http: aiohttp.ClientSession) -> None:
    async with http.get("/v1/nothing") as resp:
        assert resp.status == 404
        error = (await resp.json())["error"]
        assert error["type"] == "invalid_request_error" and "message" in error
    async with http.post(
        "/v1/chat/completions", data=b"{nope", headers={"content-type": "application/json"}
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "invalid_request_error"
    async with http.post("/v1/messages", data=b"[1]") as resp:
        assert resp.status == 400
        assert (await resp.json())["type"] == "error"
    async with http.get("/v1/chat/completions") as resp:
        assert resp.status == 405
        assert resp.headers["allow"] == "POST"


async def test_keep_alive_reuses_one_connection(mock: MockServer) -> None:
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(mock.url, connector=connector) as session:
        for _ in range(50):
            async with session.post("/v1/chat/completions", json={"model": "m"}) as resp:
                assert resp.status == 200
                await resp.read()
            async with session.post(
                "/v1/chat/completions", json={"model": "m", "stream": True}
            ) as resp:
                assert resp.headers["transfer-encoding"] == "chunked"
                assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    assert mock.connections == 1


async def test_chunked_request_body(http: aiohttp.ClientSession, mock: MockServer) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b'{"model": "chunked",'
        yield b' "input": "x"}'

    async with http.post("/v1/embeddings", data=body()) as resp:
        assert resp.status == 200
        assert (await resp.json())["model"] == "chunked"
    assert mock.requests[-1].header("transfer-encoding") == "chunked"
    assert mock.requests[-1].json() == {"model": "chunked", "input": "x"}


async def test_pipelined_requests_are_answered_in_order(mock: MockServer) -> None:
    slow = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nx-mock-latency-ms: 50\r\n\r\n"
    body = b'{"model": "second"}'
    post = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b" % (
        len(body),
        body,
    )
    last = b"GET /v1/nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer = await exchange(mock, slow + post + last)
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answer) == [b"200", b"200", b"404"]
    assert answer.index(b'"object":"list"') < answer.index(b'"model":"second"')


async def test_http10_without_keep_alive_is_closed(mock: MockServer) -> None:
    answer = await exchange(mock, b"GET /v1/models HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"connection: close\r\n" in answer
    body = b'{"stream": true}'
    streamed = await exchange(
        mock,
        b"POST /v1/chat/completions HTTP/1.0\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body),
    )
    # No chunked framing in HTTP/1.0: the body ends with the connection.
    assert b"transfer-encoding" not in streamed
    assert streamed.endswith(b"data: [DONE]\n\n")


async def test_malformed_request_gets_400_and_close(mock: MockServer) -> None:
    answer = await exchange(mock, b"NOT HTTP AT ALL\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"connection: close" in answer
    answer = await exchange(mock, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\nGARBAGE\r\n\r\n")
    assert answer.count(b"HTTP/1.1 ") == 2
    assert answer.index(b"200 OK") < answer.index(b"400 Bad Request")


async def test_head_request_gets_no_body(mock: MockServer) -> None:
    answer = await exchange(
        mock,
        b"HEAD /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    head, rest = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 405 ") and b"content-length: 0" in head
    assert rest.startswith(b"HTTP/1.1 200 OK")


async def test_expect_100_continue(mock: MockServer) -> None:
    body = b'{"model": "m"}'
    reader, writer = await asyncio.open_connection("127.0.0.1", mock.port)
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert final.startswith(b"HTTP/1.1 200 OK")
    finally:
        writer.close()
        await writer.wait_closed()


async def test_client_leaving_mid_stream_leaves_no_task(mock: MockServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", mock.port)
    body = b'{"stream": true}'
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
        b"x-mock-chunks: 50\r\nx-mock-chunk-delay-ms: 20\r\n\r\n%b" % (len(body), body)
    )
    await asyncio.wait_for(reader.readuntil(b'"content":"Hello"'), 5)
    assert mock.active_tasks == 1
    writer.close()
    await writer.wait_closed()
    for _ in range(100):
        if mock.active_tasks == 0:
            break
        await asyncio.sleep(0.01)
    assert mock.active_tasks == 0


async def test_close_stops_accepting_and_closes_connections() -> None:
    server = await start_mock()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
            b"x-mock-latency-ms: 10000\r\n\r\n{}"
        )
        await writer.drain()
        await asyncio.sleep(0.05)
        await server.close()
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()
        await writer.wait_closed()
    assert server.active_tasks == 0
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", server.port)


# -- options and command line --------------------------------------------------------------------


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="fail_rate"):
        MockOptions(fail_rate=1.5)
    with pytest.raises(ValueError, match="chunks"):
        MockOptions(chunks=-1)


def test_command_line_defaults() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    assert (args.host, args.port, args.latency_ms, args.fail_rate) == ("127.0.0.1", 4000, 0.0, 0.0)
    assert (args.chunks, args.chunk_delay_ms, args.cost) == (5, 0.0, False)
    assert args.seed is None and args.input_tokens is None and args.output_tokens is None
    args = parser.parse_args(["--port", "0", "--cost", "--fail-rate", "0.25", "--chunks", "2"])
    assert (args.port, args.cost, args.fail_rate, args.chunks) == (0, True, 0.25, 2)
    with pytest.raises(SystemExit):
        parser.parse_args(["--fail-rate", "2"])


async def test_run_serves_until_sigterm() -> None:
    script = (
        "import argparse, sys\n"
        "from sidecar.mock import add_arguments, run\n"
        "parser = argparse.ArgumentParser()\n"
        "add_arguments(parser)\n"
        "sys.exit(run(parser.parse_args(sys.argv[1:])))\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        "--port",
        "0",
        "--chunks",
        "2",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
        assert line.startswith("mock-upstream listening on http://127.0.0.1:")
        url = line.rsplit(" ", 1)[1]
        async with aiohttp.ClientSession(url) as session:
            async with session.post("/v1/chat/completions", json={"model": "m"}) as resp:
                data = await resp.json()
            assert data["choices"][0]["message"]["content"] == "Hello from"
            async with session.post("/v1/messages", json={"stream": True}) as resp:
                assert (await resp.read()).endswith(
                    b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
                )
            # A dying stream and a client leaving mid-stream must not log anything.
            async with session.post(
                "/v1/chat/completions", json={"stream": True}, headers={"x-mock-drop-after": "1"}
            ) as resp:
                with pytest.raises(aiohttp.ClientPayloadError):
                    await resp.read()
            async with session.post(
                "/v1/chat/completions",
                json={"stream": True},
                headers={"x-mock-chunk-delay-ms": "50"},
            ) as resp:
                await resp.content.readline()
                resp.close()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        _, stderr = await proc.communicate()
    assert stderr == b""
