from __future__ import annotations

import base64
import struct

import aiohttp
import openai
import pytest

from sidecar.mock import MockServer
from tests.support.mock import TEXT, USAGE_HEADERS


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
