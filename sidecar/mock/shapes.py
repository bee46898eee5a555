"""Response bodies and SSE frames, shaped like the real OpenAI and Anthropic APIs send them
(after the type definitions in the openai and anthropic packages)."""

from __future__ import annotations

import base64
import itertools
import struct
import zlib
from decimal import Decimal
from functools import lru_cache
from typing import Any, NamedTuple

import msgspec

from sidecar.mock.model import Stream

# Decimals go out as JSON numbers with their exact digits, so a test can compare a cost verbatim.
encode = msgspec.json.Encoder(decimal_format="number").encode

JSON_TYPE = b"application/json"
SSE_TYPE = b"text/event-stream; charset=utf-8"

_FINGERPRINT = b"fp_mock"
_WORDS = ("Hello", " from", " the", " mock", " upstream", ".")
_OPENAI_MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1", "o4-mini", "text-embedding-3-small")
_ANTHROPIC_MODELS = ("claude-sonnet-4-20250514", "claude-3-5-haiku-20241022")


class Usage(NamedTuple):
    prompt: int  # every prompt token: cache reads and cache writes included
    completion: int  # reasoning included
    cached: int
    cache_write: int
    reasoning: int
    cost: Decimal | None


@lru_cache(maxsize=256)
def text_parts(n: int) -> tuple[str, ...]:
    return tuple(_WORDS[i % len(_WORDS)] for i in range(n))


def _open(obj: dict[str, Any]) -> bytes:
    """The object's JSON without its closing brace, ready for more members."""
    return encode(obj)[:-1] + b","


def _event(event: dict[str, Any]) -> bytes:
    kind: str = event["type"]
    return b"event: " + kind.encode() + b"\ndata: " + encode(event) + b"\n\n"


# -- OpenAI chat completions and legacy completions -------------------------------------------

# The hottest shapes are byte templates: formatting beats building and encoding a dict.
_OPENAI_USAGE = (
    b'{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d,'
    b'"prompt_tokens_details":{"cached_tokens":%d,"audio_tokens":0%b},'
    b'"completion_tokens_details":{"reasoning_tokens":%d,"audio_tokens":0,'
    b'"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}%b}'
)
_CHAT_JSON = (
    b'{"id":"%b","object":"chat.completion","created":%d,"model":%b,"choices":%b,'
    b'"usage":%b,"service_tier":"default","system_fingerprint":"' + _FINGERPRINT + b'"}'
)


@lru_cache(maxsize=4096)
def openai_usage(u: Usage) -> bytes:
    # prompt_tokens includes the cached tokens, completion_tokens the reasoning ones.
    return _OPENAI_USAGE % (
        u.prompt,
        u.completion,
        u.prompt + u.completion,
        u.cached,
        b',"cache_write_tokens":%d' % u.cache_write if u.cache_write else b"",
        u.reasoning,
        b',"cost":' + encode(u.cost) if u.cost is not None else b"",
    )


@lru_cache(maxsize=256)
def _chat_choices(n: int) -> bytes:
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(text_parts(n)),
        "refusal": None,
        "annotations": [],
    }
    return encode([{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}])


def chat_json(rid: bytes, created: int, model: bytes, n: int, usage: bytes) -> bytes:
    """`model` is already JSON (a quoted string)."""
    return _CHAT_JSON % (rid, created, model, _chat_choices(n), usage)


def chat_stream(rid: bytes, created: int, model: bytes, n: int, usage: bytes | None) -> Stream:
    """`usage` is None unless the request asked for it with stream_options.include_usage."""
    prefix = (
        b'data: {"id":"%b","object":"chat.completion.chunk","created":%d,"model":%b,'
        b'"service_tier":"default","system_fingerprint":"%b","choices":['
        % (rid, created, model, _FINGERPRINT)
    )
    # Like the real API: "usage": null on every chunk only when usage was asked for.
    suffix = b"]}\n\n" if usage is None else b'],"usage":null}\n\n'
    first = (
        b'{"index":0,"delta":{"role":"assistant","content":"","refusal":null},'
        b'"logprobs":null,"finish_reason":null}'
    )
    content = [
        prefix
        + b'{"index":0,"delta":{"content":'
        + encode(part)
        + b'},"logprobs":null,"finish_reason":null}'
        + suffix
        for part in text_parts(n)
    ]
    tail = [prefix + b'{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}' + suffix]
    if usage is not None:
        tail.append(prefix + b'],"usage":' + usage + b"}\n\n")
    tail.append(b"data: [DONE]\n\n")
    return Stream([prefix + first + suffix], content, tail)


def completion_json(rid: str, created: int, model: str, n: int, usage: bytes) -> bytes:
    choices = [
        {"text": "".join(text_parts(n)), "index": 0, "logprobs": None, "finish_reason": "stop"}
    ]
    return encode(
        {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": msgspec.Raw(usage),
            "system_fingerprint": _FINGERPRINT.decode(),
        }
    )


def completion_stream(rid: str, created: int, model: str, n: int, usage: bytes | None) -> Stream:
    head = {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": _FINGERPRINT.decode(),
    }
    prefix = b"data: " + _open(head) + b'"choices":['
    suffix = b"]}\n\n" if usage is None else b'],"usage":null}\n\n'
    content = [
        prefix
        + b'{"text":'
        + encode(part)
        + b',"index":0,"logprobs":null,"finish_reason":null}'
        + suffix
        for part in text_parts(n)
    ]
    tail = [prefix + b'{"text":"","index":0,"logprobs":null,"finish_reason":"stop"}' + suffix]
    if usage is not None:
        tail.append(prefix + b'],"usage":' + usage + b"}\n\n")
    tail.append(b"data: [DONE]\n\n")
    return Stream([], content, tail)


# -- OpenAI Responses API ----------------------------------------------------------------------


def responses_usage(u: Usage) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "input_tokens": u.prompt,
        "input_tokens_details": {"cached_tokens": u.cached, "cache_write_tokens": u.cache_write},
        "output_tokens": u.completion,
        "output_tokens_details": {"reasoning_tokens": u.reasoning},
        "total_tokens": u.prompt + u.completion,
    }
    if u.cost is not None:
        usage["cost"] = u.cost
    return usage


class _ResponseParts:
    def __init__(
        self, echo: dict[str, Any], rid: str, item_id: str, created: int, model: str, n: int
    ) -> None:
        self.echo = echo
        self.rid = rid
        self.item_id = item_id
        self.created = created
        self.model = model
        self.parts = text_parts(n)
        self.text = "".join(self.parts)

    @staticmethod
    def output_text(value: str) -> dict[str, Any]:
        return {"type": "output_text", "annotations": [], "logprobs": [], "text": value}

    def message(self, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.item_id,
            "type": "message",
            "status": status,
            "content": content,
            "role": "assistant",
        }

    def done_item(self) -> dict[str, Any]:
        return self.message("completed", [self.output_text(self.text)])

    def response(
        self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None
    ) -> dict[str, Any]:
        echo = self.echo
        return {
            "id": self.rid,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "background": False,
            "completed_at": self.created if status == "completed" else None,
            "error": None,
            "incomplete_details": None,
            "instructions": echo.get("instructions"),
            "max_output_tokens": echo.get("max_output_tokens"),
            "max_tool_calls": None,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": echo.get("previous_response_id"),
            "prompt_cache_key": None,
            "reasoning": {"effort": None, "summary": None},
            "safety_identifier": None,
            "service_tier": "default",
            "store": echo.get("store", True),
            "temperature": echo.get("temperature", 1.0),
            "text": {"format": {"type": "text"}, "verbosity": "medium"},
            "tool_choice": "auto",
            "tools": [],
            "top_logprobs": 0,
            "top_p": echo.get("top_p", 1.0),
            "truncation": "disabled",
            "usage": usage,
            "user": None,
            "metadata": echo.get("metadata", {}),
        }


def response_json(
    echo: dict[str, Any],
    rid: str,
    item_id: str,
    created: int,
    model: str,
    n: int,
    usage: dict[str, Any],
) -> bytes:
    """`echo` holds the request's settings a response object repeats (instructions, ...)."""
    parts = _ResponseParts(echo, rid, item_id, created, model, n)
    return encode(parts.response("completed", [parts.done_item()], usage))


def response_stream(
    echo: dict[str, Any],
    rid: str,
    item_id: str,
    created: int,
    model: str,
    n: int,
    usage: dict[str, Any],
) -> Stream:
    p = _ResponseParts(echo, rid, item_id, created, model, n)
    seq = itertools.count()
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    in_progress = p.response("in_progress", [], None)
    head = [
        _event({"type": "response.created", "sequence_number": next(seq), "response": in_progress}),
        _event(
            {"type": "response.in_progress", "sequence_number": next(seq), "response": in_progress}
        ),
        _event(
            {
                "type": "response.output_item.added",
                "sequence_number": next(seq),
                "output_index": 0,
                "item": p.message("in_progress", []),
            }
        ),
        _event(
            {
                "type": "response.content_part.added",
                "sequence_number": next(seq),
                **where,
                "part": p.output_text(""),
            }
        ),
    ]
    content = [
        _event(
            {
                "type": "response.output_text.delta",
                "sequence_number": next(seq),
                **where,
                "delta": part,
                "logprobs": [],
            }
        )
        for part in p.parts
    ]
    tail = [
        _event(
            {
                "type": "response.output_text.done",
                "sequence_number": next(seq),
                **where,
                "text": p.text,
                "logprobs": [],
            }
        ),
        _event(
            {
                "type": "response.content_part.done",
                "sequence_number": next(seq),
                **where,
                "part": p.output_text(p.text),
            }
        ),
        _event(
            {
                "type": "response.output_item.done",
                "sequence_number": next(seq),
                "output_index": 0,
                "item": p.done_item(),
            }
        ),
        _event(
            {
                "type": "response.completed",
                "sequence_number": next(seq),
                "response": p.response("completed", [p.done_item()], usage),
            }
        ),
    ]
    return Stream(head, content, tail)


# -- OpenAI embeddings and models --------------------------------------------------------------


def _vector(item: Any, dims: int) -> list[float]:
    # Deterministic per input; multiples of 1/256 survive the float32 round trip of base64.
    seed = zlib.crc32(encode(item))
    return [((seed + 37 * k) % 256) / 256 - 0.5 for k in range(dims)]


def embeddings_json(
    items: list[Any], base64_format: bool, dims: int, model: str, usage: dict[str, Any]
) -> bytes:
    data = []
    for index, item in enumerate(items):
        vector = _vector(item, dims)
        embedding: list[float] | str = vector
        if base64_format:  # little-endian float32, as the SDKs decode it
            embedding = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    return encode({"object": "list", "data": data, "model": model, "usage": usage})


def _openai_model(name: str) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": 1715367049,
        "owned_by": "anthropic" if name.startswith("claude") else "openai",
    }


def _anthropic_model(name: str) -> dict[str, Any]:
    return {"type": "model", "id": name, "display_name": name, "created_at": "2025-05-14T00:00:00Z"}


def openai_models() -> bytes:
    return encode({"object": "list", "data": [_openai_model(name) for name in _OPENAI_MODELS]})


def anthropic_models() -> bytes:
    models = [_anthropic_model(name) for name in _ANTHROPIC_MODELS]
    return encode(
        {
            "data": models,
            "has_more": False,
            "first_id": models[0]["id"],
            "last_id": models[-1]["id"],
        }
    )


def openai_model(name: str) -> bytes:
    return encode(_openai_model(name))


def anthropic_model(name: str) -> bytes:
    return encode(_anthropic_model(name))


# -- Anthropic messages ------------------------------------------------------------------------


def anthropic_usage(u: Usage, cost: Decimal | None) -> dict[str, Any]:
    usage: dict[str, Any] = {
        # Anthropic's input_tokens leaves out cache reads and cache writes.
        "input_tokens": u.prompt - u.cached - u.cache_write,
        "cache_creation_input_tokens": u.cache_write,
        "cache_read_input_tokens": u.cached,
        "cache_creation": {
            "ephemeral_5m_input_tokens": u.cache_write,
            "ephemeral_1h_input_tokens": 0,
        },
        "output_tokens": u.completion,
        "service_tier": "standard",
    }
    if u.reasoning:
        usage["output_tokens_details"] = {"thinking_tokens": u.reasoning}
    if cost is not None:
        usage["cost"] = cost
    return usage


def _message(mid: str, model: str, n: int, usage: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": "".join(text_parts(n))}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": usage,
    }


def message_json(mid: str, model: str, n: int, usage: dict[str, Any]) -> bytes:
    return encode(_message(mid, model, n, usage))


def message_stream(mid: str, model: str, n: int, usage: dict[str, Any]) -> Stream:
    # message_start carries the input side and output_tokens 1; message_delta the cumulative
    # totals, as the real API sends them.
    start_usage = {**usage, "output_tokens": 1}
    start_usage.pop("cost", None)
    start_usage.pop("output_tokens_details", None)
    final_usage = {
        key: usage[key]
        for key in (
            "input_tokens",
            "cache_creation_input_tokens",
            "cache_read_input_tokens",
            "output_tokens",
            "output_tokens_details",
            "cost",
        )
        if key in usage
    }
    message = {**_message(mid, model, n, start_usage), "content": [], "stop_reason": None}
    head = [
        _event({"type": "message_start", "message": message}),
        _event(
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            }
        ),
        b'event: ping\ndata: {"type": "ping"}\n\n',
    ]
    content = [
        _event(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": part},
            }
        )
        for part in text_parts(n)
    ]
    tail = [
        _event({"type": "content_block_stop", "index": 0}),
        _event(
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": final_usage,
            }
        ),
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
    ]
    return Stream(head, content, tail)


# -- errors ------------------------------------------------------------------------------------

_OPENAI_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("permission_error", None, "You are not allowed to access this resource."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}
_OPENAI_SERVER_ERROR = (
    "server_error",
    None,
    "The server had an error while processing your request. Sorry about that!",
)
_ANTHROPIC_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your API key does not have permission to use the resource."),
    404: ("not_found_error", "The requested resource could not be found."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of requests has exceeded your rate limit."),
    529: ("overloaded_error", "Overloaded"),
}


def openai_error(status: int, message: str | None = None, etype: str | None = None) -> bytes:
    default = _OPENAI_ERRORS.get(status) or (
        _OPENAI_SERVER_ERROR
        if status >= 500
        else ("invalid_request_error", None, "Invalid request.")
    )
    kind, code, text = default
    error = {
        "message": message or text,
        "type": etype or kind,
        "param": None,
        "code": code if etype is None else None,
    }
    return encode({"error": error})


def anthropic_error(
    status: int, request_id: str, message: str | None = None, etype: str | None = None
) -> bytes:
    default = _ANTHROPIC_ERRORS.get(status) or (
        ("api_error", "Internal server error")
        if status >= 500
        else ("invalid_request_error", "Invalid request.")
    )
    error = {"type": etype or default[0], "message": message or default[1]}
    return encode({"type": "error", "error": error, "request_id": request_id})
