"""Anthropic messages, models and errors, shaped like the real API sends them."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from sidecar.mock.model import Stream
from sidecar.mock.shapes import Usage, encode, sse_event, text_parts

_MODELS = ("claude-sonnet-4-20250514", "claude-3-5-haiku-20241022")


# -- messages -----------------------------------------------------------------------------------


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
        sse_event({"type": "message_start", "message": message}),
        sse_event(
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            }
        ),
        b'event: ping\ndata: {"type": "ping"}\n\n',
    ]
    content = [
        sse_event(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": part},
            }
        )
        for part in text_parts(n)
    ]
    tail = [
        sse_event({"type": "content_block_stop", "index": 0}),
        sse_event(
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": final_usage,
            }
        ),
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
    ]
    return Stream(head, content, tail)


# -- models -------------------------------------------------------------------------------------


def _anthropic_model(name: str) -> dict[str, Any]:
    return {"type": "model", "id": name, "display_name": name, "created_at": "2025-05-14T00:00:00Z"}


def anthropic_models() -> bytes:
    models = [_anthropic_model(name) for name in _MODELS]
    return encode(
        {
            "data": models,
            "has_more": False,
            "first_id": models[0]["id"],
            "last_id": models[-1]["id"],
        }
    )


def anthropic_model(name: str) -> bytes:
    return encode(_anthropic_model(name))


# -- errors ------------------------------------------------------------------------------------

_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your API key does not have permission to use the resource."),
    404: ("not_found_error", "The requested resource could not be found."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of requests has exceeded your rate limit."),
    529: ("overloaded_error", "Overloaded"),
}


def anthropic_error(
    status: int, request_id: str, message: str | None = None, etype: str | None = None
) -> bytes:
    default = _ERRORS.get(status) or (
        ("api_error", "Internal server error")
        if status >= 500
        else ("invalid_request_error", "Invalid request.")
    )
    error = {"type": etype or default[0], "message": message or default[1]}
    return encode({"type": "error", "error": error, "request_id": request_id})
