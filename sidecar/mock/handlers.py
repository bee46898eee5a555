from __future__ import annotations

import copy
import itertools
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import msgspec

from sidecar.mock import shapes
from sidecar.mock.model import MAX_CHUNKS, MockOptions, RecordedRequest, Reply, Stream
from sidecar.mock.shapes import JSON_TYPE, SSE_TYPE, Usage

# Prices behind --cost: 1 USD per million input tokens, 2 USD per million output tokens.
_INPUT_USD = Decimal("0.000001")
_OUTPUT_USD = Decimal("0.000002")


class _BadRequest(Exception):
    pass


class _Body(msgspec.Struct):
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


_decode_body = msgspec.json.Decoder(_Body).decode
_NO_BODY = _Body()


@dataclass(slots=True)
class _Controls:
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


Handler = Callable[[RecordedRequest, _Body, _Controls], Reply]


class Router:
    def __init__(self, options: MockOptions) -> None:
        self.options = options
        self._rng = random.Random(options.seed)
        self._ids = itertools.count(1)
        self._id_base = secrets.token_hex(4)
        self._id_bytes = self._id_base.encode()
        # Routes by the path's last segment, so /v1, /openai/v1 and /v3/router prefixes work.
        self._routes: dict[str, tuple[str, Handler, str]] = {
            "/completions": ("POST", self._completion, "openai"),
            "/responses": ("POST", self._responses, "openai"),
            "/embeddings": ("POST", self._embeddings, "openai"),
            "/messages": ("POST", self._messages, "anthropic"),
            "/models": ("GET", self._models, "openai"),
        }
        self._chat_route = ("POST", self._chat, "openai")
        self._count_route = ("POST", self._count_tokens, "anthropic")
        self._defaults = _Controls(
            status=None,
            latency=options.latency_ms / 1000,
            chunks=options.chunks,
            chunk_delay=options.chunk_delay_ms / 1000,
            drop_after=None,
            input_tokens=options.input_tokens,
            output_tokens=options.output_tokens,
            cached=0,
            cache_write=0,
            reasoning=0,
            cost=None,
            response_cost=None,
        )

    # -- dispatch ----------------------------------------------------------------------------

    def route(self, req: RecordedRequest, too_large: bool = False) -> Reply:
        try:
            reply = self._route(req, too_large)
        except Exception as exc:  # a bug here must still answer, not kill the connection
            reply = self.error("openai", 500, f"mock-upstream failed: {exc!r}")
        if req.method == "HEAD":  # no route serves HEAD, but its answer must not carry a body
            reply.body = b""
            reply.stream = None
        return reply

    def _route(self, req: RecordedRequest, too_large: bool) -> Reply:
        path = req.path
        if path.endswith("/"):
            path = path.rstrip("/")
        tail = path[path.rfind("/") :]
        if tail == "/completions" and path.endswith("/chat/completions"):
            found: tuple[str, Handler, str] | None = self._chat_route
        elif tail == "/count_tokens":
            found = self._count_route if path.endswith("/messages/count_tokens") else None
        else:
            found = self._routes.get(tail)
        if found is None:
            if req.method == "GET" and "/models/" in path:
                return self._model_info(req, path.rsplit("/models/", 1)[1])
            message = f"Invalid URL ({req.method} {req.path})"
            return self.error("openai", 404, message, "invalid_request_error")
        method, handler, flavor = found
        if req.method != method:
            message = f"Method {req.method} not allowed for {req.path}"
            allow = b"allow: " + method.encode() + b"\r\n"
            return self.error(flavor, 405, message, "invalid_request_error", allow)
        if too_large:
            return self.error(flavor, 413, "Request body too large.", "invalid_request_error")
        body = _NO_BODY
        if method == "POST":
            try:
                body = _decode_body(req.body)
            except msgspec.ValidationError:
                message = "The request body must be a JSON object."
                return self.error(flavor, 400, message, "invalid_request_error")
            except msgspec.DecodeError:
                message = "We could not parse the JSON body of your request."
                return self.error(flavor, 400, message, "invalid_request_error")
        ctl = self._defaults
        try:
            if req.maybe_controls:
                ctl = self._controls(req)
            status = ctl.status
            fail_rate = self.options.fail_rate
            if status is None and fail_rate and self._rng.random() < fail_rate:
                status = 500
            reply = handler(req, body, ctl) if status is None else self.error(flavor, status)
        except _BadRequest as exc:
            return self.error(flavor, 400, str(exc), "invalid_request_error")
        reply.latency = ctl.latency
        reply.chunk_delay = ctl.chunk_delay
        reply.drop_after = ctl.drop_after
        return reply

    def _controls(self, req: RecordedRequest) -> _Controls:
        ctl: _Controls | None = None
        for name, value in req.controls():
            if ctl is None:
                # The shared defaults are never modified: most requests carry no controls.
                ctl = copy.copy(self._defaults)
            key = name[7:]
            if key == "status":
                status = _non_negative(name, value)
                if not 400 <= status <= 599:
                    raise _BadRequest(f"{name} must be between 400 and 599")
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
        return self._defaults if ctl is None else ctl

    def _usage(self, req: RecordedRequest, body: _Body, ctl: _Controls, priced: bool) -> Usage:
        prompt = ctl.input_tokens
        if prompt is None:
            prompt = len(req.body) // 4 or 1
        completion = ctl.output_tokens
        if completion is None:
            limit = body.max_tokens
            if limit is None:
                limit = body.max_completion_tokens
                if limit is None:
                    limit = body.max_output_tokens
            completion = min(max(limit, 0), 64) if type(limit) is int else 16
        if ctl is not self._defaults:
            prompt = max(prompt, ctl.cached + ctl.cache_write)
            completion = max(completion, ctl.reasoning)
        cost = ctl.cost
        if cost is None and priced and self.options.cost:
            cost = prompt * _INPUT_USD + completion * _OUTPUT_USD
        return Usage(prompt, completion, ctl.cached, ctl.cache_write, ctl.reasoning, cost)

    # -- framing -----------------------------------------------------------------------------

    def _id(self, prefix: str, n: int) -> str:
        return f"{prefix}{self._id_base}{n:010x}"

    def _headers(
        self,
        content_type: bytes,
        flavor: str,
        n: int,
        ctl: _Controls | None = None,
        extra: bytes = b"",
    ) -> bytes:
        template = (
            b"content-type: %b\r\nrequest-id: req_%b%010x\r\n"
            if flavor == "anthropic"
            else b"content-type: %b\r\nx-request-id: req_%b%010x\r\n"
        )
        lines = template % (content_type, self._id_bytes, n)
        if content_type is SSE_TYPE:
            lines += b"cache-control: no-cache\r\n"
        if ctl is not None and ctl.response_cost is not None:
            lines += b"x-litellm-response-cost: " + ctl.response_cost.encode() + b"\r\n"
        return lines + extra

    def _json(self, body: bytes, flavor: str, n: int, ctl: _Controls | None = None) -> Reply:
        return Reply(200, self._headers(JSON_TYPE, flavor, n, ctl), body)

    def _sse(self, stream: Stream, flavor: str, n: int, ctl: _Controls) -> Reply:
        return Reply(200, self._headers(SSE_TYPE, flavor, n, ctl), stream=stream)

    def error(
        self,
        flavor: str,
        status: int,
        message: str | None = None,
        etype: str | None = None,
        extra: bytes = b"",
    ) -> Reply:
        n = next(self._ids)
        if status == 429:
            extra += b"retry-after: 1\r\n"
        if flavor == "anthropic":
            body = shapes.anthropic_error(status, self._id("req_", n), message, etype)
        else:
            body = shapes.openai_error(status, message, etype)
        return Reply(status, self._headers(JSON_TYPE, flavor, n, extra=extra), body)

    # -- routes ------------------------------------------------------------------------------

    def _chat(self, req: RecordedRequest, body: _Body, ctl: _Controls) -> Reply:
        model = body.model
        model_json = shapes.encode(model) if type(model) is str and model else b'"gpt-4o-mini"'
        usage = shapes.openai_usage(self._usage(req, body, ctl, priced=True))
        n = next(self._ids)
        rid = b"chatcmpl-%b%010x" % (self._id_bytes, n)
        created = int(time.time())
        if body.stream is not True:
            return self._json(
                shapes.chat_json(rid, created, model_json, ctl.chunks, usage), "openai", n, ctl
            )
        usage_chunk = usage if _include_usage(body) else None
        stream = shapes.chat_stream(rid, created, model_json, ctl.chunks, usage_chunk)
        return self._sse(stream, "openai", n, ctl)

    def _completion(self, req: RecordedRequest, body: _Body, ctl: _Controls) -> Reply:
        model = _model(body, "gpt-3.5-turbo-instruct")
        usage = shapes.openai_usage(self._usage(req, body, ctl, priced=True))
        n = next(self._ids)
        rid = self._id("cmpl-", n)
        created = int(time.time())
        if body.stream is not True:
            return self._json(
                shapes.completion_json(rid, created, model, ctl.chunks, usage), "openai", n, ctl
            )
        usage_chunk = usage if _include_usage(body) else None
        stream = shapes.completion_stream(rid, created, model, ctl.chunks, usage_chunk)
        return self._sse(stream, "openai", n, ctl)

    def _responses(self, req: RecordedRequest, body: _Body, ctl: _Controls) -> Reply:
        usage = shapes.responses_usage(self._usage(req, body, ctl, priced=True))
        n = next(self._ids)
        args = (
            _response_echo(body),
            self._id("resp_", n),
            self._id("msg_", n),
            int(time.time()),
            _model(body, "gpt-4o-mini"),
            ctl.chunks,
            usage,
        )
        if body.stream is not True:
            return self._json(shapes.response_json(*args), "openai", n, ctl)
        return self._sse(shapes.response_stream(*args), "openai", n, ctl)

    def _embeddings(self, req: RecordedRequest, body: _Body, ctl: _Controls) -> Reply:
        raw = body.input
        items: list[Any]
        if isinstance(raw, str):
            items = [raw]
        elif isinstance(raw, list) and raw:
            # A flat list of integers is one pre-tokenised input.
            items = [raw] if all(isinstance(x, int) for x in raw) else raw
        else:
            raise _BadRequest("'input' must be a non-empty string or array")
        fmt = body.encoding_format
        if fmt not in (None, "float", "base64"):
            raise _BadRequest("'encoding_format' must be 'float' or 'base64'")
        dims = 8 if body.dimensions is None else body.dimensions
        if type(dims) is not int or not 1 <= dims <= 4096:
            raise _BadRequest("'dimensions' must be an integer between 1 and 4096")
        u = self._usage(req, body, ctl, priced=False)
        usage: dict[str, Any] = {"prompt_tokens": u.prompt, "total_tokens": u.prompt}
        cost = ctl.cost
        if cost is None and self.options.cost:
            cost = u.prompt * _INPUT_USD
        if cost is not None:
            usage["cost"] = cost
        model = _model(body, "text-embedding-3-small")
        n = next(self._ids)
        return self._json(
            shapes.embeddings_json(items, fmt == "base64", dims, model, usage), "openai", n, ctl
        )

    def _messages(self, req: RecordedRequest, body: _Body, ctl: _Controls) -> Reply:
        usage = shapes.anthropic_usage(self._usage(req, body, ctl, priced=False), ctl.cost)
        n = next(self._ids)
        mid = self._id("msg_", n)
        model = _model(body, "claude-sonnet-4-20250514")
        if body.stream is not True:
            return self._json(
                shapes.message_json(mid, model, ctl.chunks, usage), "anthropic", n, ctl
            )
        stream = shapes.message_stream(mid, model, ctl.chunks, usage)
        return self._sse(stream, "anthropic", n, ctl)

    def _count_tokens(self, req: RecordedRequest, body: _Body, ctl: _Controls) -> Reply:
        u = self._usage(req, body, ctl, priced=False)
        return self._json(shapes.encode({"input_tokens": u.prompt}), "anthropic", next(self._ids))

    def _models(self, req: RecordedRequest, body: _Body, ctl: _Controls) -> Reply:
        n = next(self._ids)
        if req.header("anthropic-version") is not None:
            return self._json(shapes.anthropic_models(), "anthropic", n, ctl)
        return self._json(shapes.openai_models(), "openai", n, ctl)

    def _model_info(self, req: RecordedRequest, name: str) -> Reply:
        n = next(self._ids)
        if req.header("anthropic-version") is not None:
            return self._json(shapes.anthropic_model(name), "anthropic", n)
        return self._json(shapes.openai_model(name), "openai", n)


def _model(body: _Body, default: str) -> str:
    model = body.model
    return model if type(model) is str and model else default


def _include_usage(body: _Body) -> bool:
    options = body.stream_options
    return type(options) is dict and options.get("include_usage") is True


def _response_echo(body: _Body) -> dict[str, Any]:
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
        raise _BadRequest(f"{name} must be an integer") from None
    if number < 0:
        raise _BadRequest(f"{name} must not be negative")
    return number


def _milliseconds(name: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise _BadRequest(f"{name} must be a number of milliseconds") from None
    if not 0 <= number < 3_600_000:
        raise _BadRequest(f"{name} is out of range")
    return number / 1000


def _usd(name: str, value: str) -> Decimal:
    try:
        number = Decimal(value.strip())
    except InvalidOperation:
        raise _BadRequest(f"{name} must be a decimal number of USD") from None
    if not number.is_finite() or number < 0:
        raise _BadRequest(f"{name} must be a non-negative decimal number of USD")
    return number
