from __future__ import annotations

import json
import random
from typing import Any

import anthropic.types
import openai.types
import openai.types.chat
import openai.types.responses
import pydantic
import pytest

from sidecar.errors import InvalidRequest
from sidecar.usage.extract import (
    StreamUsage,
    cost_from_header,
    extract_json,
    prepare_request,
)
from sidecar.usage.model import Kind, Usage
from tests.support import samples
from tests.support.samples import dumps, sse

CHAT = Usage(
    input_tokens=1337,
    cached_input_tokens=1024,
    output_tokens=421,
    reasoning_tokens=256,
    model=samples.CHAT_MODEL,
)
COMPLETIONS = Usage(input_tokens=57, output_tokens=112, model=samples.COMPLETIONS_MODEL)
RESPONSES = Usage(
    input_tokens=2048,
    cached_input_tokens=1536,
    output_tokens=733,
    reasoning_tokens=512,
    model=samples.RESPONSES_MODEL,
)
EMBEDDINGS = Usage(input_tokens=19, model=samples.EMBEDDINGS_MODEL)
# Anthropic's input_tokens (25) leaves out cache reads (3200) and cache writes (1800).
MESSAGES = Usage(
    input_tokens=25 + 3200 + 1800,
    cached_input_tokens=3200,
    cache_write_tokens=1800,
    output_tokens=503,
    model=samples.MESSAGES_MODEL,
)


# --- the samples are what the SDKs accept -----------------------------------------------------


@pytest.mark.parametrize(
    ("model", "body"),
    [
        (openai.types.chat.ChatCompletion, samples.CHAT_JSON),
        (openai.types.Completion, samples.COMPLETIONS_JSON),
        (openai.types.responses.Response, samples.RESPONSES_JSON),
        (openai.types.CreateEmbeddingResponse, samples.EMBEDDINGS_JSON),
        (anthropic.types.Message, samples.MESSAGES_JSON),
    ],
)
def test_json_samples_match_the_sdk_types(model: type[pydantic.BaseModel], body: Any) -> None:
    model.model_validate(body)


def test_stream_samples_match_the_sdk_types() -> None:
    for chunk in samples.CHAT_CHUNKS + samples.CHAT_SPARSE_CHUNKS:
        openai.types.chat.ChatCompletionChunk.model_validate(chunk)
    for chunk in samples.COMPLETIONS_CHUNKS:
        # The API streams finish_reason null until the end; the SDK's Completion type, shared
        # with the non-streamed body, does not allow it. Everything else must match.
        openai.types.Completion.model_validate(
            {
                **chunk,
                "choices": [
                    {**choice, "finish_reason": choice["finish_reason"] or "length"}
                    for choice in chunk["choices"]
                ],
            }
        )
    responses = pydantic.TypeAdapter(openai.types.responses.ResponseStreamEvent)
    for event in samples.RESPONSES_STREAM_EVENTS:
        responses.validate_python(event)
    messages = pydantic.TypeAdapter(anthropic.types.RawMessageStreamEvent)
    for event in samples.MESSAGES_STREAM_EVENTS:
        # The SDK drops "ping" before parsing; it has no type for it.
        if event["type"] != "ping":
            messages.validate_python(event)


# --- JSON bodies --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "body", "expected"),
    [
        (Kind.CHAT, samples.CHAT_JSON, CHAT),
        (Kind.COMPLETIONS, samples.COMPLETIONS_JSON, COMPLETIONS),
        (Kind.RESPONSES, samples.RESPONSES_JSON, RESPONSES),
        (Kind.EMBEDDINGS, samples.EMBEDDINGS_JSON, EMBEDDINGS),
        (Kind.MESSAGES, samples.MESSAGES_JSON, MESSAGES),
    ],
)
def test_extract_json(kind: Kind, body: dict[str, Any], expected: Usage) -> None:
    usage = extract_json(kind, dumps(body))
    assert usage == expected
    assert usage is not None
    assert usage.total_tokens == expected.input_tokens + expected.output_tokens


def test_anthropic_reasoning_is_the_thinking_part_of_output() -> None:
    usage = {**samples.MESSAGES_USAGE, "output_tokens_details": {"thinking_tokens": 311}}
    got = extract_json(Kind.MESSAGES, dumps({**samples.MESSAGES_JSON, "usage": usage}))
    assert got is not None
    assert (got.output_tokens, got.reasoning_tokens) == (503, 311)


def test_anthropic_cache_writes_by_ttl_when_the_total_is_missing() -> None:
    usage = {
        "input_tokens": 10,
        "cache_creation": {"ephemeral_5m_input_tokens": 300, "ephemeral_1h_input_tokens": 700},
        "output_tokens": 5,
    }
    got = extract_json(Kind.MESSAGES, dumps({"usage": usage}))
    assert got == Usage(input_tokens=1010, cache_write_tokens=1000, output_tokens=5)


def test_responses_cache_writes() -> None:
    usage = {
        **samples.RESPONSES_USAGE,
        "input_tokens_details": {"cached_tokens": 1000, "cache_write_tokens": 900},
    }
    got = extract_json(Kind.RESPONSES, dumps({"usage": usage}))
    assert got is not None
    assert (got.input_tokens, got.cached_input_tokens, got.cache_write_tokens) == (2048, 1000, 900)


def test_litellm_chat_usage_with_anthropic_cache_fields() -> None:
    # LiteLLM answering /chat/completions for a Claude model: prompt_tokens includes the cache.
    usage = {
        "prompt_tokens": 5025,
        "completion_tokens": 503,
        "total_tokens": 5528,
        "prompt_tokens_details": {"cached_tokens": 3200},
        "cache_creation_input_tokens": 1800,
        "cache_read_input_tokens": 3200,
    }
    got = extract_json(Kind.CHAT, dumps({"model": "claude-sonnet-4-20250514", "usage": usage}))
    assert got == Usage(
        input_tokens=5025,
        cached_input_tokens=3200,
        cache_write_tokens=1800,
        output_tokens=503,
        model="claude-sonnet-4-20250514",
    )


def test_deepseek_cache_hits() -> None:
    usage = {
        "prompt_tokens": 900,
        "completion_tokens": 40,
        "prompt_cache_hit_tokens": 640,
        "prompt_cache_miss_tokens": 260,
    }
    got = extract_json(Kind.CHAT, dumps({"usage": usage}))
    assert got == Usage(input_tokens=900, cached_input_tokens=640, output_tokens=40)


def test_the_usage_shape_wins_over_the_path() -> None:
    # A gateway answering an OpenAI path with an Anthropic body, and the reverse.
    assert extract_json(Kind.CHAT, dumps(samples.MESSAGES_JSON)) == MESSAGES
    assert extract_json(Kind.MESSAGES, dumps(samples.CHAT_JSON)) == CHAT


@pytest.mark.parametrize(
    ("usage_cost", "nanos"),
    [
        ({"cost": 0.00123}, 1_230_000),
        ({"cost": 1}, 1_000_000_000),
        ({"total_cost": 0.0000000125}, 13),  # 12.5 nanos rounds half up
        ({"cost": 0.1, "total_cost": 9.0}, 100_000_000),
        ({"cost": 0.0}, 0),
        ({"cost": True}, None),
        ({"cost": -0.5}, None),
        ({"cost": "0.5"}, None),
        ({"cost": None}, None),
        ({"cost": 1e300}, None),
    ],
)
def test_upstream_cost_in_usage(usage_cost: dict[str, Any], nanos: int | None) -> None:
    body = {"model": "x", "usage": {"prompt_tokens": 1, "completion_tokens": 2, **usage_cost}}
    got = extract_json(Kind.CHAT, dumps(body))
    assert got is not None
    assert got.cost_nanos == nanos


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"null",
        b"[]",
        b"42",
        b'"usage"',
        b"{",
        b'{"usage": ',
        b'{"usage": null}',
        b'{"usage": [1, 2]}',
        b'{"usage": "lots"}',
        b'{"model": "gpt-4o"}',
        b"\xff\xfe\x00garbage",
        b"[" * 100_000,
        b'{"usage": ' + b"[" * 100_000,
        dumps(samples.CHAT_JSON)[:-1],
    ],
)
def test_no_usage_in_garbage(body: bytes) -> None:
    assert extract_json(Kind.CHAT, body) is None


@pytest.mark.parametrize(
    "bad",
    [-5, "12", True, 1.5, float("inf"), None, [], {}, 2**64, 1e20],
)
@pytest.mark.parametrize("kind", list(Kind))
def test_bad_counts_count_zero(kind: Kind, bad: Any) -> None:
    fields = [
        "prompt_tokens",
        "completion_tokens",
        "input_tokens",
        "output_tokens",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
    ]
    text = dumps({"usage": dict.fromkeys(fields, 0)}).replace(b"0", b"BAD")
    body = text.replace(b"BAD", dumps(bad) if bad != float("inf") else b"1e999")
    usage = extract_json(kind, body)
    assert usage is None or usage == Usage()


def test_integral_floats_are_counts() -> None:
    got = extract_json(Kind.CHAT, b'{"usage": {"prompt_tokens": 12.0, "completion_tokens": 3}}')
    assert got == Usage(input_tokens=12, output_tokens=3)


def test_parts_never_exceed_their_whole() -> None:
    usage = {
        "prompt_tokens": 100,
        "completion_tokens": 10,
        "prompt_tokens_details": {"cached_tokens": 150, "cache_write_tokens": 50},
        "completion_tokens_details": {"reasoning_tokens": 11},
    }
    got = extract_json(Kind.CHAT, dumps({"usage": usage}))
    assert got == Usage(
        input_tokens=100, cached_input_tokens=100, output_tokens=10, reasoning_tokens=10
    )


def test_a_non_string_model_is_dropped() -> None:
    got = extract_json(Kind.CHAT, dumps({"model": 7, "usage": samples.CHAT_USAGE}))
    assert got is not None
    assert got.model is None


# --- cost header ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "nanos"),
    [
        ("0.00123", 1_230_000),
        (" 0.00123 ", 1_230_000),
        ("1.5e-05", 15_000),
        ("0", 0),
        ("3", 3_000_000_000),
        (".5", 500_000_000),
        ("0.0000000004", 0),
        ("0.0000000005", 1),
        (None, None),
        ("", None),
        ("nan", None),
        ("inf", None),
        ("-0.1", None),
        ("1_0", None),
        ("0x10", None),
        ("1e400", None),
        ("0.1 USD", None),
        ("9" * 100, None),
    ],
)
def test_cost_from_header(value: str | None, nanos: int | None) -> None:
    assert cost_from_header(value) == nanos


# --- prepare_request -----------------------------------------------------------------------------


def test_prepare_request_asks_for_usage() -> None:
    body: dict[str, Any] = {"model": "gpt-4o", "stream": True, "messages": []}
    assert prepare_request(Kind.CHAT, body) is True
    assert body["stream_options"] == {"include_usage": True}


def test_prepare_request_keeps_other_stream_options() -> None:
    options = {"include_obfuscation": False, "include_usage": False}
    body: dict[str, Any] = {"stream": True, "stream_options": options}
    assert prepare_request(Kind.COMPLETIONS, body) is True
    assert body["stream_options"] is options
    assert options == {"include_obfuscation": False, "include_usage": True}


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        (Kind.CHAT, {"stream": True, "stream_options": {"include_usage": True}}),
        (Kind.CHAT, {"stream": False}),
        (Kind.CHAT, {}),
        (Kind.CHAT, {"stream": None, "stream_options": "yes"}),
        (Kind.RESPONSES, {"stream": True}),
        (Kind.MESSAGES, {"stream": True}),
        (Kind.EMBEDDINGS, {"stream": True}),
    ],
)
def test_prepare_request_leaves_alone(kind: Kind, body: dict[str, Any]) -> None:
    before = repr(body)
    assert prepare_request(kind, body) is False
    assert repr(body) == before


@pytest.mark.parametrize(
    ("kind", "body", "param"),
    [
        # A lax server streams on these, without the usage the sidecar would have asked for.
        (Kind.CHAT, {"stream": "true"}, "stream"),
        (Kind.CHAT, {"stream": 1}, "stream"),
        (Kind.MESSAGES, {"stream": "yes"}, "stream"),
        (Kind.CHAT, {"stream": True, "stream_options": "yes"}, "stream_options"),
        (Kind.COMPLETIONS, {"stream": True, "stream_options": []}, "stream_options"),
    ],
)
def test_prepare_request_refuses_a_stream_it_could_not_ask_for_usage(
    kind: Kind, body: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequest) as refused:
        prepare_request(kind, body)
    assert refused.value.param == param


# --- streams -------------------------------------------------------------------------------------


def run(kind: Kind, pieces: list[bytes], *, strip: bool = False) -> tuple[bytes, Usage | None]:
    stream = StreamUsage(kind, strip_usage_chunk=strip)
    out = [fed(stream, piece) for piece in pieces]
    out.append(stream.flush())
    return b"".join(out), stream.finish()


def fed(stream: StreamUsage, piece: bytes) -> bytes:
    """`stream.feed(piece)`, holding `passes` to its word: a piece it lets through before it is
    read is given back as it is."""
    passes = stream.passes(piece)
    out = stream.feed(piece)
    assert out == piece or not passes, piece
    return out


STREAMS = [
    pytest.param(Kind.CHAT, samples.CHAT_STREAM, CHAT, id="chat"),
    pytest.param(Kind.CHAT, samples.CHAT_SPARSE_STREAM, CHAT, id="chat-sparse"),
    pytest.param(Kind.COMPLETIONS, samples.COMPLETIONS_STREAM, COMPLETIONS, id="completions"),
    pytest.param(Kind.RESPONSES, samples.RESPONSES_STREAM, RESPONSES, id="responses"),
    pytest.param(Kind.MESSAGES, samples.MESSAGES_STREAM, MESSAGES, id="messages"),
]

STRIPPED = [
    pytest.param(
        Kind.CHAT, samples.CHAT_STREAM, samples.CHAT_STREAM_WITHOUT_USAGE_CHUNK, id="chat"
    ),
    pytest.param(
        Kind.CHAT,
        samples.CHAT_SPARSE_STREAM,
        samples.CHAT_SPARSE_STREAM_WITHOUT_USAGE_CHUNK,
        id="chat-sparse",
    ),
    pytest.param(
        Kind.COMPLETIONS,
        samples.COMPLETIONS_STREAM,
        samples.COMPLETIONS_STREAM_WITHOUT_USAGE_CHUNK,
        id="completions",
    ),
]


@pytest.mark.parametrize(("kind", "stream", "expected"), STREAMS)
def test_stream_usage(kind: Kind, stream: bytes, expected: Usage) -> None:
    out, usage = run(kind, [stream])
    assert usage == expected
    assert out == stream


@pytest.mark.parametrize(("kind", "stream", "expected"), STREAMS)
def test_stream_usage_one_event_per_chunk(kind: Kind, stream: bytes, expected: Usage) -> None:
    events = [event + b"\n\n" for event in stream.split(b"\n\n") if event]
    assert b"".join(events) == stream
    assert run(kind, events)[1] == expected


@pytest.mark.parametrize(("kind", "stream", "expected"), STREAMS)
def test_stream_split_at_every_offset(kind: Kind, stream: bytes, expected: Usage) -> None:
    for offset in range(len(stream) + 1):
        out, usage = run(kind, [stream[:offset], stream[offset:]])
        assert usage == expected, offset
        assert out == stream, offset


@pytest.mark.parametrize(("kind", "stream", "expected"), STREAMS)
def test_stream_byte_by_byte(kind: Kind, stream: bytes, expected: Usage) -> None:
    pieces = [stream[i : i + 1] for i in range(len(stream))]
    assert run(kind, pieces) == (stream, expected)


@pytest.mark.parametrize(("kind", "stream", "expected"), STREAMS)
def test_stream_random_splits(kind: Kind, stream: bytes, expected: Usage) -> None:
    rng = random.Random(kind.value)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(1, 12)))
        pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        assert run(kind, pieces) == (stream, expected)


# Every offset again, for each other framing: the slowest of the fast loop (`-m "not slow"`),
# where the same splits with "\n" stay.
@pytest.mark.slow
@pytest.mark.parametrize("newline", [b"\r\n", b"\r"])
@pytest.mark.parametrize(("kind", "stream", "expected"), STREAMS)
def test_stream_other_line_endings(
    kind: Kind, stream: bytes, expected: Usage, newline: bytes
) -> None:
    # The samples' JSON has no raw newlines (they are escaped inside strings), so this only
    # rewrites the SSE framing.
    converted = stream.replace(b"\n", newline)
    for offset in range(len(converted) + 1):
        out, usage = run(kind, [converted[:offset], converted[offset:]])
        assert usage == expected, offset
        assert out == converted, offset


def test_non_strip_feed_returns_the_same_object() -> None:
    stream = StreamUsage(Kind.CHAT)
    for event in samples.CHAT_EVENTS:
        for piece in (event[:7], event[7:]):
            assert stream.feed(piece) is piece
    assert stream.flush() == b""
    assert stream.finish() == CHAT


@pytest.mark.parametrize(("kind", "stream", "expected"), STRIPPED)
def test_strip_usage_chunk(kind: Kind, stream: bytes, expected: bytes) -> None:
    out, usage = run(kind, [stream], strip=True)
    assert out == expected
    assert usage is not None
    assert usage.input_tokens > 0


@pytest.mark.parametrize(("kind", "stream", "expected"), STRIPPED)
def test_strip_usage_chunk_split_at_every_offset(
    kind: Kind, stream: bytes, expected: bytes
) -> None:
    whole = run(kind, [stream], strip=True)[1]
    for offset in range(len(stream) + 1):
        assert run(kind, [stream[:offset], stream[offset:]], strip=True) == (expected, whole)


@pytest.mark.parametrize(("kind", "stream", "expected"), STRIPPED)
def test_strip_usage_chunk_byte_by_byte(kind: Kind, stream: bytes, expected: bytes) -> None:
    pieces = [stream[i : i + 1] for i in range(len(stream))]
    out, usage = run(kind, pieces, strip=True)
    assert out == expected
    assert usage is not None


@pytest.mark.slow
@pytest.mark.parametrize("newline", [b"\r\n", b"\r"])
def test_strip_usage_chunk_other_line_endings(newline: bytes) -> None:
    stream = samples.CHAT_STREAM.replace(b"\n", newline)
    expected = samples.CHAT_STREAM_WITHOUT_USAGE_CHUNK.replace(b"\n", newline)
    for offset in range(len(stream) + 1):
        assert run(Kind.CHAT, [stream[:offset], stream[offset:]], strip=True) == (expected, CHAT)


def test_strip_forwards_complete_events_at_once() -> None:
    stream = StreamUsage(Kind.CHAT, strip_usage_chunk=True)
    first = samples.CHAT_EVENTS[0]
    assert stream.passes(first)  # sent before it is read
    assert stream.feed(first) is first
    assert not stream.passes(samples.CHAT_EVENTS[1] + b"data: {")  # an event not over
    # Only the unfinished event is held back.
    second = samples.CHAT_EVENTS[1]
    assert stream.feed(second + b"data: {") == second
    assert stream.flush() == b"data: {"


def test_strip_forwards_an_event_whose_blank_line_was_split() -> None:
    stream = StreamUsage(Kind.CHAT, strip_usage_chunk=True)
    first = samples.CHAT_EVENTS[0].replace(b"\n", b"\r\n")
    assert stream.feed(first[:-1]) == b""
    assert stream.feed(b"\ndata: {") == first
    assert stream.flush() == b"data: {"


def test_strip_keeps_a_chunk_with_both_choices_and_usage() -> None:
    chunks = samples.chat_chunks(usage_null_in_every_chunk=False)
    last_content = {**chunks[-2], "usage": samples.CHAT_USAGE}
    stream = b"".join(sse(chunk) for chunk in [*chunks[:-2], last_content]) + samples.DONE
    assert run(Kind.CHAT, [stream], strip=True) == (stream, CHAT)


def test_strip_is_only_for_chat_and_completions() -> None:
    assert run(Kind.MESSAGES, [samples.MESSAGES_STREAM], strip=True) == (
        samples.MESSAGES_STREAM,
        MESSAGES,
    )


def test_strip_multi_line_data_event() -> None:
    usage_chunk = dumps(samples.CHAT_CHUNKS[-1])
    cut = usage_chunk.index(b'"usage"')
    multi = b"data: " + usage_chunk[:cut] + b"\ndata: " + usage_chunk[cut:] + b"\n\n"
    stream = b"".join(samples.CHAT_EVENTS[:-1]) + multi + samples.DONE
    assert run(Kind.CHAT, [stream], strip=True) == (samples.CHAT_STREAM_WITHOUT_USAGE_CHUNK, CHAT)


def test_comments_and_other_fields_are_ignored() -> None:
    noisy = b": keep-alive\n\nretry: 3000\n\nid: 7\nevent: x\n" + samples.CHAT_EVENTS[-1]
    stream = b"".join(samples.CHAT_EVENTS[:-1]) + noisy + samples.DONE
    assert run(Kind.CHAT, [stream]) == (stream, CHAT)


def test_stream_without_usage() -> None:
    stream = b"".join(samples.CHAT_EVENTS[:-1]) + samples.DONE
    assert run(Kind.CHAT, [stream]) == (stream, None)
    assert run(Kind.CHAT, [stream], strip=True) == (stream, None)
    assert run(Kind.CHAT, []) == (b"", None)


def test_last_event_without_its_blank_line_still_counts() -> None:
    stream = b"".join(samples.CHAT_EVENTS)[:-1]
    assert run(Kind.CHAT, [stream]) == (stream, CHAT)
    # In strip mode it is held until the end and then dropped, being the usage-only chunk.
    assert run(Kind.CHAT, [stream], strip=True) == (b"".join(samples.CHAT_EVENTS[:-1]), CHAT)


def test_finish_is_repeatable() -> None:
    stream = StreamUsage(Kind.MESSAGES)
    stream.feed(samples.MESSAGES_STREAM)
    assert stream.finish() == MESSAGES
    assert stream.finish() == MESSAGES


# --- Anthropic streams ---------------------------------------------------------------------------


def test_anthropic_disconnect_before_message_delta() -> None:
    # The client left after a few text deltas: input and cache as billed, output so far.
    events = samples.MESSAGES_SSE_EVENTS
    stream = StreamUsage(Kind.MESSAGES)
    for event in events[:6]:
        stream.feed(event)
    assert stream.finish() == Usage(
        input_tokens=5025,
        cached_input_tokens=3200,
        cache_write_tokens=1800,
        output_tokens=1,
        model=samples.MESSAGES_MODEL,
    )


def test_anthropic_disconnect_inside_message_delta() -> None:
    stream = StreamUsage(Kind.MESSAGES)
    whole = samples.MESSAGES_STREAM
    stream.feed(whole[: whole.index(b'"output_tokens":503') + 10])
    usage = stream.finish()
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens) == (5025, 1)


def test_anthropic_disconnect_after_message_delta() -> None:
    events = samples.MESSAGES_SSE_EVENTS
    assert run(Kind.MESSAGES, events[:-1])[1] == MESSAGES


def test_anthropic_old_message_delta_with_output_only() -> None:
    events = list(samples.MESSAGES_STREAM_EVENTS)
    events[-2] = {**events[-2], "usage": {"output_tokens": 503}}
    stream = b"".join(sse(event, event["type"]) for event in events)
    assert run(Kind.MESSAGES, [stream])[1] == MESSAGES


def test_anthropic_message_delta_nulls_keep_earlier_values() -> None:
    events = list(samples.MESSAGES_STREAM_EVENTS)
    delta_usage = {
        "input_tokens": None,
        "cache_creation_input_tokens": None,
        "cache_read_input_tokens": 3300,
        "output_tokens": 600,
    }
    events[-2] = {**events[-2], "usage": delta_usage}
    stream = b"".join(sse(event, event["type"]) for event in events)
    assert run(Kind.MESSAGES, [stream])[1] == Usage(
        input_tokens=25 + 3300 + 1800,
        cached_input_tokens=3300,
        cache_write_tokens=1800,
        output_tokens=600,
        model=samples.MESSAGES_MODEL,
    )


def test_anthropic_stream_without_event_lines() -> None:
    stream = b"".join(sse(event) for event in samples.MESSAGES_STREAM_EVENTS)
    assert run(Kind.MESSAGES, [stream])[1] == MESSAGES


# --- Responses streams ---------------------------------------------------------------------------


@pytest.mark.parametrize("final", ["response.incomplete", "response.failed"])
def test_responses_usage_from_unfinished_responses(final: str) -> None:
    events = list(samples.RESPONSES_STREAM_EVENTS)
    status = final.removeprefix("response.")
    events[-1] = {
        **events[-1],
        "type": final,
        "response": {**events[-1]["response"], "status": status},
    }
    stream = b"".join(sse(event, event["type"]) for event in events)
    assert run(Kind.RESPONSES, [stream])[1] == RESPONSES


def test_responses_disconnect_before_completion_has_no_usage() -> None:
    stream = b"".join(sse(event, event["type"]) for event in samples.RESPONSES_STREAM_EVENTS[:-1])
    assert run(Kind.RESPONSES, [stream])[1] is None


# --- garbage never raises -----------------------------------------------------------------------


GARBAGE = [
    b"",
    b"\n\n\n\n",
    b"\r\r\r",
    b"data:\n\n",
    b"data\n\n",
    b"data: [DONE]\n\n",
    b'data: {"usage": 5}\n\n',
    b'data: {"usage": {"prompt_tokens": "x"}}\n\n',
    b'data: {"usage": {"prompt_tokens": -1, "completion_tokens": 1e999}}\n\n',
    b'data: {"usage": ' + b"[" * 50_000 + b"\n\n",
    b'data: {"message": "oops", "usage": {}}\n\n',
    b'data: {"response": [], "usage": {}}\n\n',
    b'data: {"model": null}\n\n' * 10,
    b'data: ["usage", {"usage": 1}]\n\n',
    b'data: \xff\xfe "usage": {}\n\n',
    b"event: message_start\ndata: {not json}\n\n",
    bytes(range(256)) * 4,
]


@pytest.mark.parametrize("strip", [False, True])
@pytest.mark.parametrize("kind", list(Kind))
def test_garbage_streams_never_raise(kind: Kind, strip: bool) -> None:
    rng = random.Random(3)
    for garbage in GARBAGE:
        out, usage = run(kind, [garbage], strip=strip)
        assert out == garbage or strip
        assert usage is None or isinstance(usage, Usage)
    for _ in range(200):
        blob = rng.randbytes(rng.randint(0, 300)) + rng.choice(GARBAGE)
        run(kind, [blob[:50], blob[50:]], strip=strip)


@pytest.mark.parametrize("kind", list(Kind))
def test_truncated_streams_never_raise(kind: Kind) -> None:
    for stream in (samples.CHAT_STREAM, samples.MESSAGES_STREAM, samples.RESPONSES_STREAM):
        for end in range(0, len(stream), 17):
            run(kind, [stream[:end]])
            run(kind, [stream[:end]], strip=True)


def test_an_oversized_unterminated_event_is_passed_on_in_strip_mode() -> None:
    stream = StreamUsage(Kind.CHAT, strip_usage_chunk=True)
    head = b"data: " + b"x" * (8 * 1024 * 1024)
    assert stream.feed(head) == b""
    tail = b"y" * (9 * 1024 * 1024)
    assert stream.feed(tail) == head + tail
    rest = b"z\n\n" + samples.CHAT_EVENTS[-1]
    # The rest of the oversized event, then the usage-only chunk, which is still dropped.
    assert stream.feed(rest) == b"z\n\n"
    assert stream.finish() == CHAT


def test_the_answers_model_comes_from_its_events_when_the_usage_event_names_none() -> None:
    """Events that only name the model are read once the stream is over, not on their way to
    the client: a usage event without a model still gets the answer's, however the stream is
    cut into chunks."""

    def event(body: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    chunk = {"object": "chat.completion.chunk", "model": "gpt-4o-2024-08-06"}
    events = [
        event({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant"}}]}),
        event({**chunk, "choices": [{"index": 0, "delta": {"content": "hi"}}]}),
        event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}),
        b"data: [DONE]\n\n",
    ]
    whole = b"".join(events)
    for pieces in (events, [whole], [b"", whole], [whole[:5], whole[5:]]):
        stream = StreamUsage(Kind.CHAT)
        for piece in pieces:
            stream.feed(piece)
        usage = stream.finish()
        assert usage is not None and usage.model == "gpt-4o-2024-08-06"
        assert (usage.input_tokens, usage.output_tokens) == (3, 1)
