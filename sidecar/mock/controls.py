"""What the mock reads from a request: a few body fields, and the x-mock-* headers that
control its answer."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import msgspec

from sidecar.mock.model import MAX_CHUNKS, RecordedRequest


class BadRequest(Exception):
    pass


class Body(msgspec.Struct):
    """The request fields the mock reads. The decoder skips everything else (messages, tools)
    without building it into Python objects, which matters for long conversations."""

    model: Any = None
    stream: Any = None
    stream_options: Any = None
    max_tokens: Any = None
    max_completion_tokens: Any = None
    max_output_tokens: Any = None
    input: Any = None
    encoding_format: Any = None
    dimensions: Any = None
    instructions: Any = None
    temperature: Any = None
    top_p: Any = None
    metadata: Any = None
    previous_response_id: Any = None
    store: Any = None
    n: Any = None
    best_of: Any = None
    prompt: Any = None


def outputs(body: Body) -> int:
    """How many outputs of up to the request's cap a real upstream may produce: each choice
    (`n`, a completion's `best_of`) of each prompt (a completion's `prompt` as a list)."""
    choices = max((v for v in (body.n, body.best_of) if type(v) is int), default=1)
    prompt = body.prompt
    prompts = sum(type(p) is not int for p in prompt) if type(prompt) is list else 1
    return max(1, choices) * max(1, prompts)


decode_body = msgspec.json.Decoder(Body).decode
NO_BODY = Body()


@dataclass(slots=True)
class Controls:
    """The effective per-request settings: the options, overridden by x-mock-* headers."""

    status: int | None
    latency: float
    chunks: int
    chunk_delay: float
    drop_after: int | None
    input_tokens: int | None
    output_tokens: int | None
    cached: int
    cache_write: int
    reasoning: int
    cost: Decimal | None
    response_cost: str | None


def parse_controls(req: RecordedRequest, defaults: Controls) -> Controls:
    """The x-mock-* headers over `defaults`; `defaults` itself when there are none."""
    ctl: Controls | None = None
    for name, value in req.controls():
        if ctl is None:
            # The shared defaults are never modified: most requests carry no controls.
            ctl = copy.copy(defaults)
        key = name[7:]
        if key == "status":
            status = _non_negative(name, value)
            if not 400 <= status <= 599:
                raise BadRequest(f"{name} must be between 400 and 599")
            ctl.status = status
        elif key == "latency-ms":
            ctl.latency = _milliseconds(name, value)
        elif key == "chunk-delay-ms":
            ctl.chunk_delay = _milliseconds(name, value)
        elif key == "chunks":
            ctl.chunks = min(_non_negative(name, value), MAX_CHUNKS)
        elif key == "drop-after":
            ctl.drop_after = _non_negative(name, value)
        elif key == "input-tokens":
            ctl.input_tokens = _non_negative(name, value)
        elif key == "output-tokens":
            ctl.output_tokens = _non_negative(name, value)
        elif key == "cached-tokens":
            ctl.cached = _non_negative(name, value)
        elif key == "cache-write-tokens":
            ctl.cache_write = _non_negative(name, value)
        elif key == "reasoning-tokens":
            ctl.reasoning = _non_negative(name, value)
        elif key == "cost":
            ctl.cost = _usd(name, value)
        elif key == "response-cost":
            _usd(name, value)
            ctl.response_cost = value.strip()
    return defaults if ctl is None else ctl


def model_name(body: Body, default: str) -> str:
    model = body.model
    return model if type(model) is str and model else default


def include_usage(body: Body) -> bool:
    options = body.stream_options
    return type(options) is dict and options.get("include_usage") is True


def response_echo(body: Body) -> dict[str, Any]:
    """The request settings a Responses API object repeats, where they have the right type."""
    echo: dict[str, Any] = {}
    for key, kinds in (
        ("instructions", (str,)),
        ("max_output_tokens", (int,)),
        ("previous_response_id", (str,)),
        ("temperature", (int, float)),
        ("top_p", (int, float)),
        ("metadata", (dict,)),
        ("store", (bool,)),
    ):
        value = getattr(body, key)
        if type(value) in kinds:
            echo[key] = value
    return echo


def _non_negative(name: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise BadRequest(f"{name} must be an integer") from None
    if number < 0:
        raise BadRequest(f"{name} must not be negative")
    return number


def _milliseconds(name: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise BadRequest(f"{name} must be a number of milliseconds") from None
    if not 0 <= number < 3_600_000:
        raise BadRequest(f"{name} is out of range")
    return number / 1000


def _usd(name: str, value: str) -> Decimal:
    try:
        number = Decimal(value.strip())
    except InvalidOperation:
        raise BadRequest(f"{name} must be a decimal number of USD") from None
    if not number.is_finite() or number < 0:
        raise BadRequest(f"{name} must be a non-negative decimal number of USD")
    return number
