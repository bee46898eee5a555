"""OpenAI chat completions, legacy completions, embeddings, models and errors, shaped like the
real API sends them."""

from __future__ import annotations

import base64
import struct
import zlib
from functools import lru_cache
from typing import Any

import msgspec

from sidecar.mock.model import Stream
from sidecar.mock.shapes import Usage, encode, text_parts

_FINGERPRINT = b"fp_mock"
_MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1", "o4-mini", "text-embedding-3-small")


def _open(obj: dict[str, Any]) -> bytes:
    """The object's JSON without its closing brace, ready for more members."""
    return encode(obj)[:-1] + b","


# -- chat completions and legacy completions ---------------------------------------------------

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


# -- embeddings and models ---------------------------------------------------------------------


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


def openai_models() -> bytes:
    return encode({"object": "list", "data": [_openai_model(name) for name in _MODELS]})


def openai_model(name: str) -> bytes:
    return encode(_openai_model(name))


# -- errors ------------------------------------------------------------------------------------

_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("permission_error", None, "You are not allowed to access this resource."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}
_SERVER_ERROR = (
    "server_error",
    None,
    "The server had an error while processing your request. Sorry about that!",
)


def openai_error(status: int, message: str | None = None, etype: str | None = None) -> bytes:
    default = _ERRORS.get(status) or (
        _SERVER_ERROR if status >= 500 else ("invalid_request_error", None, "Invalid request.")
    )
    kind, code, text = default
    error = {
        "message": message or text,
        "type": etype or kind,
        "param": None,
        "code": code if etype is None else None,
    }
    return encode({"error": error})
