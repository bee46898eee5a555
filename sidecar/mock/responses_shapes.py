"""OpenAI Responses API objects and their stream of events, shaped like the real API sends
them."""

from __future__ import annotations

import itertools
from typing import Any

from sidecar.mock.model import Stream
from sidecar.mock.shapes import Usage, encode, sse_event, text_parts


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
        sse_event(
            {"type": "response.created", "sequence_number": next(seq), "response": in_progress}
        ),
        sse_event(
            {"type": "response.in_progress", "sequence_number": next(seq), "response": in_progress}
        ),
        sse_event(
            {
                "type": "response.output_item.added",
                "sequence_number": next(seq),
                "output_index": 0,
                "item": p.message("in_progress", []),
            }
        ),
        sse_event(
            {
                "type": "response.content_part.added",
                "sequence_number": next(seq),
                **where,
                "part": p.output_text(""),
            }
        ),
    ]
    content = [
        sse_event(
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
        sse_event(
            {
                "type": "response.output_text.done",
                "sequence_number": next(seq),
                **where,
                "text": p.text,
                "logprobs": [],
            }
        ),
        sse_event(
            {
                "type": "response.content_part.done",
                "sequence_number": next(seq),
                **where,
                "part": p.output_text(p.text),
            }
        ),
        sse_event(
            {
                "type": "response.output_item.done",
                "sequence_number": next(seq),
                "output_index": 0,
                "item": p.done_item(),
            }
        ),
        sse_event(
            {
                "type": "response.completed",
                "sequence_number": next(seq),
                "response": p.response("completed", [p.done_item()], usage),
            }
        ),
    ]
    return Stream(head, content, tail)
