from __future__ import annotations

import anthropic

from tests.support.mock import TEXT

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
