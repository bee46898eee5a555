from __future__ import annotations

import openai

from tests.support.mock import TEXT, USAGE_HEADERS


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
