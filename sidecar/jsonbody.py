"""A metered request's body: a JSON object whatever its Content-Type says, nested at most
MAX_DEPTH levels, naming what the sidecar reads as the API spells it, once. Anything else is a
400 (never a 500, never forwarded unmetered)."""

from __future__ import annotations

import json
import re
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


# Those an upstream acts on, where it could read another value than the sidecar did. The
# identity's carriers that the sidecar cuts out of what it forwards are its alone; OpenAI's
# `user` and Anthropic's `metadata` stay in the body, and an upstream (or a gateway's own
# per-user budgets) that keeps the first of two would read another end user than the one the
# sidecar checked the claim of.
UPSTREAM_READ_NAMES = READ_NAMES - {"identity", "orq", "contact"}
# Read inside stream_options (whether a stream's usage comes at its end) and metadata (the end
# user Anthropic's clients name).
NESTED_READ_NAMES = frozenset({"include_usage", "user_id"})
# Each such name quoted, and as an object's key (`"max_tokens" :`), in the bytes as sent.
_QUOTED = {name: b'"%s"' % name.encode() for name in UPSTREAM_READ_NAMES | NESTED_READ_NAMES}
_AS_KEY = {name: re.compile(re.escape(q) + rb"\s*:") for name, q in _QUOTED.items()}
# An escape that spells a lower-case letter or `_` (`\u005f`), which no JSON encoder writes for
# its own names, but which would spell one of those names where the bytes do not show it.
_NAME_ESCAPE = re.compile(rb"\\u00[5-7]")


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
    repeats = False
    for name in value:
        if name in UPSTREAM_READ_NAMES:
            repeats = repeats or _named_twice(body, name)
        elif not (name.isascii() and name.islower()) and name.casefold() in READ_NAMES:
            folded = name.casefold()
            message = (
                f"the body names {name!r}, which a server matching names regardless of case "
                f"reads as {folded!r}: send it as {folded!r}"
            )
            raise InvalidRequest(message, param=name, code="field_not_normalized")
    if "stream_options" in value:
        repeats = repeats or _named_twice(body, "include_usage")
    if "metadata" in value:
        repeats = repeats or _named_twice(body, "user_id")
    # The scans for repeats cost the bench's chat request 7,500 instructions (32,800 where
    # reading it took 25,300: 0.9% of what the sidecar spends on the request, bench.instr_bench):
    # a search per name and one for an escape, its pattern matched only where there is one.
    if repeats or (b"\\u00" in body and _NAME_ESCAPE.search(body) is not None):
        _refuse_repeated(body)
    return value


def _named_twice(body: bytes, name: str) -> bool:
    """Whether the bytes may name `name` twice as a key: msgspec (as most parsers) keeps the
    last of two, where other servers keep the first (simdjson's on-demand API does) and would
    keep to an output cap, a model or a stream's usage option the sidecar did not reserve,
    price or read. A search in C (30 us on 100 KB, where reading it takes 90); true also for
    a name in two objects (a tool's schema may name `model`), which `_refuse_repeated` then
    tells apart."""
    return body.count(_QUOTED[name]) > 1 and len(_AS_KEY[name].findall(body)) > 1


def _refuse_repeated(body: bytes) -> None:
    """Raise InvalidRequest when the body's object names twice a field an upstream acts on, or
    its stream_options names `include_usage` twice (escapes decoded). The body is read again,
    each object's names in order: on the rare body the searches above do not clear,
    at two to three times the cost of reading it once."""
    top: list[str | None] = [None]  # the last object read is the body's own
    nested: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        repeated = None
        if len(items) > 1 and len({name for name, _ in items}) < len(items):
            seen: set[str] = set()
            for name, _ in items:
                if name in seen:
                    if name in NESTED_READ_NAMES:
                        nested.append(name)
                    elif repeated is None and name in UPSTREAM_READ_NAMES:
                        repeated = name
                seen.add(name)
        top[0] = repeated
        return dict(items)

    try:
        json.loads(body, object_pairs_hook=pairs)
    except (ValueError, RecursionError):  # msgspec took it: not expected, refused all the same
        raise InvalidRequest("request body is not valid JSON", code="invalid_json") from None
    name = top[0] or (nested[0] if nested else None)
    if name is not None:
        message = (
            f"the body names {name!r} twice in one object, which servers read differently (the "
            "first or the last): send it once"
        )
        raise InvalidRequest(message, param=name, code="field_repeated")


def _too_deep() -> InvalidRequest:
    return InvalidRequest(
        f"request body nests deeper than {MAX_DEPTH} levels", code="json_too_deep"
    )
