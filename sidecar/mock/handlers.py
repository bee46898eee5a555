"""The mock's routes: which answer a request gets, in which API's shape."""

from __future__ import annotations

import itertools
import random
import secrets
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import msgspec

from sidecar.mock import anthropic_shapes, openai_shapes, responses_shapes
from sidecar.mock.controls import (
    NO_BODY,
    BadRequest,
    Body,
    Controls,
    decode_body,
    include_usage,
    model_name,
    outputs,
    parse_controls,
    response_echo,
)
from sidecar.mock.model import MockOptions, RecordedRequest, Reply, Stream
from sidecar.mock.shapes import JSON_TYPE, SSE_TYPE, Usage, encode

# Prices behind --cost: 1 USD per million input tokens, 2 USD per million output tokens.
_INPUT_USD = Decimal("0.000001")
_OUTPUT_USD = Decimal("0.000002")


Handler = Callable[[RecordedRequest, Body, Controls], Reply]


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
        self._defaults = Controls(
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
        body = NO_BODY
        if method == "POST":
            try:
                body = decode_body(req.body)
            except msgspec.ValidationError:
                message = "The request body must be a JSON object."
                return self.error(flavor, 400, message, "invalid_request_error")
            except msgspec.DecodeError:
                message = "We could not parse the JSON body of your request."
                return self.error(flavor, 400, message, "invalid_request_error")
        ctl = self._defaults
        try:
            if req.maybe_controls:
                ctl = parse_controls(req, self._defaults)
            status = ctl.status
            fail_rate = self.options.fail_rate
            if status is None and fail_rate and self._rng.random() < fail_rate:
                status = 500
            reply = handler(req, body, ctl) if status is None else self.error(flavor, status)
        except BadRequest as exc:
            return self.error(flavor, 400, str(exc), "invalid_request_error")
        reply.latency = ctl.latency
        reply.chunk_delay = ctl.chunk_delay
        reply.drop_after = ctl.drop_after
        return reply

    def _usage(self, req: RecordedRequest, body: Body, ctl: Controls, priced: bool) -> Usage:
        prompt = ctl.input_tokens
        if prompt is None:
            prompt = len(req.body) // 4 or 1
        limit = body.max_tokens
        if limit is None:
            limit = body.max_completion_tokens
            if limit is None:
                limit = body.max_output_tokens
        completion = ctl.output_tokens
        if completion is None:
            completion = min(max(limit, 0), 64) if type(limit) is int else 16
        elif type(limit) is int:
            # As a real upstream: never past the cap, for each output asked for.
            completion = min(completion, max(limit, 0) * outputs(body))
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
        ctl: Controls | None = None,
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

    def _json(self, body: bytes, flavor: str, n: int, ctl: Controls | None = None) -> Reply:
        return Reply(200, self._headers(JSON_TYPE, flavor, n, ctl), body)

    def _sse(self, stream: Stream, flavor: str, n: int, ctl: Controls) -> Reply:
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
            body = anthropic_shapes.anthropic_error(status, self._id("req_", n), message, etype)
        else:
            body = openai_shapes.openai_error(status, message, etype)
        return Reply(status, self._headers(JSON_TYPE, flavor, n, extra=extra), body)

    # -- routes ------------------------------------------------------------------------------

    def _chat(self, req: RecordedRequest, body: Body, ctl: Controls) -> Reply:
        model = body.model
        model_json = encode(model) if type(model) is str and model else b'"gpt-4o-mini"'
        usage = openai_shapes.openai_usage(self._usage(req, body, ctl, priced=True))
        n = next(self._ids)
        rid = b"chatcmpl-%b%010x" % (self._id_bytes, n)
        created = int(time.time())
        if body.stream is not True:
            return self._json(
                openai_shapes.chat_json(rid, created, model_json, ctl.chunks, usage),
                "openai",
                n,
                ctl,
            )
        usage_chunk = usage if include_usage(body) else None
        stream = openai_shapes.chat_stream(rid, created, model_json, ctl.chunks, usage_chunk)
        return self._sse(stream, "openai", n, ctl)

    def _completion(self, req: RecordedRequest, body: Body, ctl: Controls) -> Reply:
        model = model_name(body, "gpt-3.5-turbo-instruct")
        usage = openai_shapes.openai_usage(self._usage(req, body, ctl, priced=True))
        n = next(self._ids)
        rid = self._id("cmpl-", n)
        created = int(time.time())
        if body.stream is not True:
            return self._json(
                openai_shapes.completion_json(rid, created, model, ctl.chunks, usage),
                "openai",
                n,
                ctl,
            )
        usage_chunk = usage if include_usage(body) else None
        stream = openai_shapes.completion_stream(rid, created, model, ctl.chunks, usage_chunk)
        return self._sse(stream, "openai", n, ctl)

    def _responses(self, req: RecordedRequest, body: Body, ctl: Controls) -> Reply:
        usage = responses_shapes.responses_usage(self._usage(req, body, ctl, priced=True))
        n = next(self._ids)
        args = (
            response_echo(body),
            self._id("resp_", n),
            self._id("msg_", n),
            int(time.time()),
            model_name(body, "gpt-4o-mini"),
            ctl.chunks,
            usage,
        )
        if body.stream is not True:
            return self._json(responses_shapes.response_json(*args), "openai", n, ctl)
        return self._sse(responses_shapes.response_stream(*args), "openai", n, ctl)

    def _embeddings(self, req: RecordedRequest, body: Body, ctl: Controls) -> Reply:
        raw = body.input
        items: list[Any]
        if isinstance(raw, str):
            items = [raw]
        elif isinstance(raw, list) and raw:
            # A flat list of integers is one pre-tokenised input.
            items = [raw] if all(isinstance(x, int) for x in raw) else raw
        else:
            raise BadRequest("'input' must be a non-empty string or array")
        fmt = body.encoding_format
        if fmt not in (None, "float", "base64"):
            raise BadRequest("'encoding_format' must be 'float' or 'base64'")
        dims = 8 if body.dimensions is None else body.dimensions
        if type(dims) is not int or not 1 <= dims <= 4096:
            raise BadRequest("'dimensions' must be an integer between 1 and 4096")
        u = self._usage(req, body, ctl, priced=False)
        usage: dict[str, Any] = {"prompt_tokens": u.prompt, "total_tokens": u.prompt}
        cost = ctl.cost
        if cost is None and self.options.cost:
            cost = u.prompt * _INPUT_USD
        if cost is not None:
            usage["cost"] = cost
        model = model_name(body, "text-embedding-3-small")
        n = next(self._ids)
        return self._json(
            openai_shapes.embeddings_json(items, fmt == "base64", dims, model, usage),
            "openai",
            n,
            ctl,
        )

    def _messages(self, req: RecordedRequest, body: Body, ctl: Controls) -> Reply:
        usage = anthropic_shapes.anthropic_usage(
            self._usage(req, body, ctl, priced=False), ctl.cost
        )
        n = next(self._ids)
        mid = self._id("msg_", n)
        model = model_name(body, "claude-sonnet-4-20250514")
        if body.stream is not True:
            return self._json(
                anthropic_shapes.message_json(mid, model, ctl.chunks, usage), "anthropic", n, ctl
            )
        stream = anthropic_shapes.message_stream(mid, model, ctl.chunks, usage)
        return self._sse(stream, "anthropic", n, ctl)

    def _count_tokens(self, req: RecordedRequest, body: Body, ctl: Controls) -> Reply:
        u = self._usage(req, body, ctl, priced=False)
        return self._json(encode({"input_tokens": u.prompt}), "anthropic", next(self._ids))

    def _models(self, req: RecordedRequest, body: Body, ctl: Controls) -> Reply:
        n = next(self._ids)
        if req.header("anthropic-version") is not None:
            return self._json(anthropic_shapes.anthropic_models(), "anthropic", n, ctl)
        return self._json(openai_shapes.openai_models(), "openai", n, ctl)

    def _model_info(self, req: RecordedRequest, name: str) -> Reply:
        n = next(self._ids)
        if req.header("anthropic-version") is not None:
            return self._json(anthropic_shapes.anthropic_model(name), "anthropic", n)
        return self._json(openai_shapes.openai_model(name), "openai", n)
