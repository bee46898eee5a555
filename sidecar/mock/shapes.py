"""What every shape of the mock's answers shares: the JSON encoder, content types, token counts
and the text a reply says. The shapes follow the type definitions in the openai and anthropic
packages."""

from __future__ import annotations

from decimal import Decimal
from functools import lru_cache
from typing import Any, NamedTuple

import msgspec

# Decimals go out as JSON numbers with their exact digits, so a test can compare a cost verbatim.
encode = msgspec.json.Encoder(decimal_format="number").encode

JSON_TYPE = b"application/json"
SSE_TYPE = b"text/event-stream; charset=utf-8"

_WORDS = ("Hello", " from", " the", " mock", " upstream", ".")


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


def sse_event(event: dict[str, Any]) -> bytes:
    """A named SSE event, as the Responses API and Anthropic send them."""
    kind: str = event["type"]
    return b"event: " + kind.encode() + b"\ndata: " + encode(event) + b"\n\n"
