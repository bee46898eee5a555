"""Responses as the OpenAI and Anthropic APIs send them, JSON bodies and SSE streams.

Every token count is distinct so a test can tell which field a number came from. The shapes are
checked against the official SDKs' models in test_extract.py, so they cannot drift from the APIs.
"""

from __future__ import annotations

import json
from typing import Any

# Multi-byte UTF-8 in the text, so byte-wise splits land inside characters.
TEXT_PARTS = ["Bonjour", " — ça", " va", " très", " bien ☕", " 日本語", "!"]


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    payload = data if isinstance(data, bytes) else dumps(data)
    return head + b"data: " + payload + b"\n\n"


DONE = b"data: [DONE]\n\n"

# --- OpenAI chat completions ----------------------------------------------------------------

CHAT_MODEL = "o4-mini-2025-04-16"

CHAT_USAGE: dict[str, Any] = {
    "prompt_tokens": 1337,
    "completion_tokens": 421,
    "total_tokens": 1758,
    "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 256,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}

CHAT_JSON: dict[str, Any] = {
    "id": "chatcmpl-BPx8Jq2fvYtKZ0lQ4m1aNn3Wc7RrS",
    "object": "chat.completion",
    "created": 1745510000,
    "model": CHAT_MODEL,
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "".join(TEXT_PARTS),
                "refusal": None,
                "annotations": [],
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": CHAT_USAGE,
    "service_tier": "default",
    "system_fingerprint": None,
}


def _chunk(choices: list[dict[str, Any]], *, usage: Any, with_usage_key: bool) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": "chatcmpl-BPx9Kq3gwZuLa1mR5n2bOo4Xd8SsT",
        "object": "chat.completion.chunk",
        "created": 1745510001,
        "model": CHAT_MODEL,
        "service_tier": "default",
        "system_fingerprint": None,
        "choices": choices,
    }
    if with_usage_key:
        chunk["usage"] = usage
    return chunk


def chat_chunks(*, usage_null_in_every_chunk: bool) -> list[dict[str, Any]]:
    """The chunks of a chat stream with stream_options.include_usage, the usage chunk last.

    OpenAI puts "usage":null in every chunk once include_usage is on; other servers leave it out.
    """
    flag = usage_null_in_every_chunk
    chunks = [
        _chunk(
            [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": "", "refusal": None},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
            usage=None,
            with_usage_key=flag,
        )
    ]
    for part in TEXT_PARTS:
        chunks.append(
            _chunk(
                [{"index": 0, "delta": {"content": part}, "logprobs": None, "finish_reason": None}],
                usage=None,
                with_usage_key=flag,
            )
        )
    chunks.append(
        _chunk(
            [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
            usage=None,
            with_usage_key=flag,
        )
    )
    chunks.append(_chunk([], usage=CHAT_USAGE, with_usage_key=True))
    return chunks


CHAT_CHUNKS = chat_chunks(usage_null_in_every_chunk=True)
CHAT_EVENTS = [sse(chunk) for chunk in CHAT_CHUNKS]
# What the API sends when the client asked for usage itself.
CHAT_STREAM = b"".join(CHAT_EVENTS) + DONE
# The same stream as the client sees when the sidecar asked for usage on its behalf.
CHAT_STREAM_WITHOUT_USAGE_CHUNK = b"".join(CHAT_EVENTS[:-1]) + DONE

# A server that omits "usage" from all chunks but the last (LiteLLM, vLLM and others do).
CHAT_SPARSE_CHUNKS = chat_chunks(usage_null_in_every_chunk=False)
CHAT_SPARSE_EVENTS = [sse(chunk) for chunk in CHAT_SPARSE_CHUNKS]
CHAT_SPARSE_STREAM = b"".join(CHAT_SPARSE_EVENTS) + DONE
CHAT_SPARSE_STREAM_WITHOUT_USAGE_CHUNK = b"".join(CHAT_SPARSE_EVENTS[:-1]) + DONE

# --- OpenAI legacy completions --------------------------------------------------------------

COMPLETIONS_MODEL = "gpt-3.5-turbo-instruct"
COMPLETIONS_USAGE: dict[str, Any] = {
    "prompt_tokens": 57,
    "completion_tokens": 112,
    "total_tokens": 169,
}

COMPLETIONS_JSON: dict[str, Any] = {
    "id": "cmpl-BPxA1b2c3d4e5f6g7h8i9j0kLmN",
    "object": "text_completion",
    "created": 1745510100,
    "model": COMPLETIONS_MODEL,
    "choices": [
        {"text": "".join(TEXT_PARTS), "index": 0, "logprobs": None, "finish_reason": "length"}
    ],
    "usage": COMPLETIONS_USAGE,
}


def _completion_chunk(text: str, finish: str | None) -> dict[str, Any]:
    return {
        "id": "cmpl-BPxA1b2c3d4e5f6g7h8i9j0kLmN",
        "object": "text_completion",
        "created": 1745510100,
        "model": COMPLETIONS_MODEL,
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
        "usage": None,
    }


COMPLETIONS_CHUNKS: list[dict[str, Any]] = [
    *(_completion_chunk(part, None) for part in TEXT_PARTS),
    _completion_chunk("", "length"),
    {
        "id": "cmpl-BPxA1b2c3d4e5f6g7h8i9j0kLmN",
        "object": "text_completion",
        "created": 1745510100,
        "model": COMPLETIONS_MODEL,
        "choices": [],
        "usage": COMPLETIONS_USAGE,
    },
]
COMPLETIONS_EVENTS = [sse(chunk) for chunk in COMPLETIONS_CHUNKS]
COMPLETIONS_STREAM = b"".join(COMPLETIONS_EVENTS) + DONE
COMPLETIONS_STREAM_WITHOUT_USAGE_CHUNK = b"".join(COMPLETIONS_EVENTS[:-1]) + DONE

# --- OpenAI responses -----------------------------------------------------------------------

RESPONSES_MODEL = "o4-mini-2025-04-16"
RESPONSES_USAGE: dict[str, Any] = {
    "input_tokens": 2048,
    "input_tokens_details": {"cached_tokens": 1536, "cache_write_tokens": 0},
    "output_tokens": 733,
    "output_tokens_details": {"reasoning_tokens": 512},
    "total_tokens": 2781,
}

_MESSAGE_ID = "msg_68a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5"
_REASONING_ID = "rs_68a1b2c3d4e5f6a7b8c9d0e1f2a3b4c6"


def _response(status: str, output: list[dict[str, Any]], usage: Any) -> dict[str, Any]:
    return {
        "id": "resp_68a1b2c3d4e5f6a7b8c9d0e1f2a3b4c7",
        "object": "response",
        "created_at": 1745510200,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "max_output_tokens": None,
        "model": RESPONSES_MODEL,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": "medium", "summary": None},
        "service_tier": "default",
        "store": True,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": {},
    }


_REASONING_ITEM: dict[str, Any] = {"id": _REASONING_ID, "type": "reasoning", "summary": []}


def _message_item(status: str, text: str | None) -> dict[str, Any]:
    content = [] if text is None else [{"type": "output_text", "annotations": [], "text": text}]
    return {
        "id": _MESSAGE_ID,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content,
    }


_FULL_TEXT = "".join(TEXT_PARTS)
RESPONSES_JSON = _response(
    "completed", [_REASONING_ITEM, _message_item("completed", _FULL_TEXT)], RESPONSES_USAGE
)


def _responses_events() -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": _response("in_progress", [], None)},
        {"type": "response.in_progress", "response": _response("in_progress", [], None)},
        {"type": "response.output_item.added", "output_index": 0, "item": _REASONING_ITEM},
        {"type": "response.output_item.done", "output_index": 0, "item": _REASONING_ITEM},
        {
            "type": "response.output_item.added",
            "output_index": 1,
            "item": _message_item("in_progress", None),
        },
        {
            "type": "response.content_part.added",
            "item_id": _MESSAGE_ID,
            "output_index": 1,
            "content_index": 0,
            "part": {"type": "output_text", "annotations": [], "text": ""},
        },
    ]
    for part in TEXT_PARTS:
        events.append(
            {
                "type": "response.output_text.delta",
                "item_id": _MESSAGE_ID,
                "output_index": 1,
                "content_index": 0,
                "delta": part,
                "logprobs": [],
            }
        )
    events += [
        {
            "type": "response.output_text.done",
            "item_id": _MESSAGE_ID,
            "output_index": 1,
            "content_index": 0,
            "text": _FULL_TEXT,
            "logprobs": [],
        },
        {
            "type": "response.content_part.done",
            "item_id": _MESSAGE_ID,
            "output_index": 1,
            "content_index": 0,
            "part": {"type": "output_text", "annotations": [], "text": _FULL_TEXT},
        },
        {
            "type": "response.output_item.done",
            "output_index": 1,
            "item": _message_item("completed", _FULL_TEXT),
        },
        {"type": "response.completed", "response": RESPONSES_JSON},
    ]
    for number, event in enumerate(events):
        event["sequence_number"] = number
    return events


RESPONSES_STREAM_EVENTS = _responses_events()
RESPONSES_STREAM = b"".join(sse(event, event["type"]) for event in RESPONSES_STREAM_EVENTS)

# --- OpenAI embeddings ----------------------------------------------------------------------

EMBEDDINGS_MODEL = "text-embedding-3-small"
EMBEDDINGS_JSON: dict[str, Any] = {
    "object": "list",
    "data": [
        {"object": "embedding", "index": 0, "embedding": [0.0023064255, -0.009327292, 0.015797347]},
        {"object": "embedding", "index": 1, "embedding": [-0.0028842222, 0.011450746, 0.00458218]},
    ],
    "model": EMBEDDINGS_MODEL,
    "usage": {"prompt_tokens": 19, "total_tokens": 19},
}

# --- Anthropic messages ---------------------------------------------------------------------

MESSAGES_MODEL = "claude-sonnet-4-20250514"
# input_tokens here excludes the cache reads and writes.
MESSAGES_USAGE: dict[str, Any] = {
    "input_tokens": 25,
    "cache_creation_input_tokens": 1800,
    "cache_read_input_tokens": 3200,
    "cache_creation": {"ephemeral_5m_input_tokens": 1800, "ephemeral_1h_input_tokens": 0},
    "output_tokens": 503,
    "service_tier": "standard",
}

MESSAGES_JSON: dict[str, Any] = {
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
    "type": "message",
    "role": "assistant",
    "model": MESSAGES_MODEL,
    "content": [{"type": "text", "text": _FULL_TEXT}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": MESSAGES_USAGE,
}

MESSAGES_START_USAGE: dict[str, Any] = {**MESSAGES_USAGE, "output_tokens": 1}
# Newer API versions repeat the input-side counts in message_delta; older ones send only output.
MESSAGES_DELTA_USAGE: dict[str, Any] = {
    "input_tokens": 25,
    "cache_creation_input_tokens": 1800,
    "cache_read_input_tokens": 3200,
    "output_tokens": 503,
}


def _messages_events() -> list[dict[str, Any]]:
    start_message = {
        **MESSAGES_JSON,
        "content": [],
        "stop_reason": None,
        "usage": MESSAGES_START_USAGE,
    }
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": start_message},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
    ]
    for part in TEXT_PARTS:
        events.append(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": part},
            }
        )
    events += [
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": MESSAGES_DELTA_USAGE,
        },
        {"type": "message_stop"},
    ]
    return events


MESSAGES_STREAM_EVENTS = _messages_events()
MESSAGES_SSE_EVENTS = [sse(event, event["type"]) for event in MESSAGES_STREAM_EVENTS]
MESSAGES_STREAM = b"".join(MESSAGES_SSE_EVENTS)
