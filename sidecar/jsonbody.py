"""A metered request's body: a JSON object whatever its Content-Type says, nested at most
MAX_DEPTH levels, naming what the sidecar reads as the API spells it. Anything else is a 400
(never a 500, never forwarded unmetered)."""

from __future__ import annotations

from typing import Any

import msgspec

from sidecar.errors import InvalidRequest

MAX_DEPTH = 64
_decode = msgspec.json.Decoder().decode
_NOT_BRACKETS = bytes(range(256)).translate(None, b"[]{}")
# The top-level names of a metered body the sidecar reads to attribute, price, reserve or count
# it. A server that matches names regardless of case (Go's encoding/json, .NET's Newtonsoft)
# reads `MAX_TOKENS` (or `stream` with U+017F for its s, `max_tokens` with a Kelvin sign for its
# k) as one of them, where the sidecar reads nothing or the lower-case twin: a reservation, a
# price or an output cap the upstream does not keep to.
READ_NAMES = frozenset(
    {
        "model",
        "max_tokens",
        "max_completion_tokens",
        "max_output_tokens",
        "n",
        "best_of",
        "stream",
        "stream_options",
        "identity",
        "orq",
        "contact",
        "user",
        "metadata",
        "prompt",
        "tools",
        "web_search_options",
        "previous_response_id",
        "conversation",
        "mcp_servers",
    }
)


def _shallow(body: bytes) -> bool:
    """True when the body nests at most MAX_DEPTH levels for sure; False when it may not.

    Brackets are counted in the raw bytes, strings included: a body with few of them is
    shallow; otherwise matched pairs are removed, innermost first, one level per pass, and a
    body whose brackets are all gone within MAX_DEPTH passes is shallow. Brackets inside
    strings can only make it look deeper, never shallower. All of it runs in C: a tenth of a
    Python walk of the decoded document."""
    if body.count(b"{") + body.count(b"[") <= MAX_DEPTH:
        return True
    brackets = body.translate(None, _NOT_BRACKETS)
    for _ in range(MAX_DEPTH):
        brackets = brackets.replace(b"[]", b"").replace(b"{}", b"")
        if not brackets:
            return True
    return False


def _deeper(value: Any, depth: int = 1) -> bool:
    if depth > MAX_DEPTH:
        return True
    children = value.values() if type(value) is dict else value
    for child in children:
        if (type(child) is dict or type(child) is list) and _deeper(child, depth + 1):
            return True
    return False


def parse_optional(body: bytes) -> dict[str, Any] | None:
    """None for an empty body, else as `parse_object`."""
    return parse_object(body) if body.strip() else None


def parse_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object. InvalidRequest (400) for anything else: not JSON, not an
    object, nested deeper than MAX_DEPTH."""
    try:
        value = _decode(body)
    except msgspec.DecodeError:
        raise InvalidRequest("request body is not valid JSON", code="invalid_json") from None
    except RecursionError:
        raise _too_deep() from None
    if type(value) is not dict:
        raise InvalidRequest("request body must be a JSON object", code="invalid_json")
    if not _shallow(body) and _deeper(value):
        raise _too_deep()
    for name in value:
        if not (name.isascii() and name.islower()) and name.casefold() in READ_NAMES:
            folded = name.casefold()
            message = (
                f"the body names {name!r}, which a server matching names regardless of case "
                f"reads as {folded!r}: send it as {folded!r}"
            )
            raise InvalidRequest(message, param=name, code="field_not_normalized")
    return value


def _too_deep() -> InvalidRequest:
    return InvalidRequest(
        f"request body nests deeper than {MAX_DEPTH} levels", code="json_too_deep"
    )
