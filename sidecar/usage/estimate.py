"""What a request may use at most, from the request alone: reserved at admission against the
token and cost limits of a limited identity, replaced by the actual once it is answered.

Input: the request body's length in bytes / 3, plus 16. A token is rarely shorter than 3 bytes
of JSON (English runs about 4 characters a token; the body also holds keys, quotes and roles,
which are not tokens), so this over-estimates, which is the direction a reservation may err in.
Output: the request's own cap (`max_tokens`, `max_completion_tokens`, `max_output_tokens`), else
`[limits] default_output_reserve`, for each choice asked for (`n`; a completion's `best_of`, all of
which are generated and billed); an embedding produces none.

What the estimate reads must be a whole number (or null, or absent): anything else is refused
(400), not guessed at. An upstream that reads `"max_tokens": "100000"` or `"n": "128"` as numbers
(a lax parser: pydantic's, as many OpenAI-compatible servers use) would otherwise produce output
no reservation counted. A whole number written as a float (`64.0`) is read as that number."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sidecar.errors import InvalidRequest
from sidecar.usage.model import Kind

BYTES_PER_TOKEN = 3
INPUT_OVERHEAD = 16
_CAPS = {
    Kind.CHAT: ("max_completion_tokens", "max_tokens"),
    Kind.COMPLETIONS: ("max_tokens",),
    Kind.RESPONSES: ("max_output_tokens",),
    Kind.MESSAGES: ("max_tokens",),
    Kind.EMBEDDINGS: (),
}


# Where a request's own output cap goes when it names none (see `cap_output`).
OUTPUT_CAP = {
    Kind.CHAT: "max_completion_tokens",
    Kind.COMPLETIONS: "max_tokens",
    Kind.RESPONSES: "max_output_tokens",
    Kind.MESSAGES: "max_tokens",
}


def cap_output(kind: Kind | None, body: dict[str, Any], cap: int) -> bool:
    """Give a request that names no output cap this one (the output its reservation counted);
    True when the body changed. Embeddings and unknown paths are left alone."""
    name = OUTPUT_CAP.get(kind) if kind is not None else None
    if kind is None or name is None:
        return False
    for field in _CAPS[kind]:
        if _cap(body, field) is not None:
            return False
    body[name] = cap
    return True


# How many choices a request asks for (OpenAI's chat and completions); each has its own output cap.
_CHOICES = {
    Kind.CHAT: ("n",),
    Kind.COMPLETIONS: ("n", "best_of"),
    Kind.RESPONSES: (),
    Kind.MESSAGES: (),
    Kind.EMBEDDINGS: (),
}
# Hook mode, where the path is not known: every kind's fields.
_ANY_CAPS = tuple(dict.fromkeys(name for names in _CAPS.values() for name in names))
_ANY_CHOICES = tuple(dict.fromkeys(name for names in _CHOICES.values() for name in names))


def _cap(body: Mapping[str, Any], name: str) -> int | None:
    """A whole number >= 0 the request sets, None when it sets none (absent or null); raises
    InvalidRequest for anything else."""
    value = body.get(name)
    if value is None:
        return None
    kind = type(value)
    if kind is int and value >= 0:
        return int(value)
    if kind is float and value >= 0 and value.is_integer():
        return int(value)
    raise InvalidRequest(f"'{name}' must be a whole number of at least 0", param=name)


def _largest(body: Mapping[str, Any], names: tuple[str, ...]) -> int | None:
    """The largest of the whole numbers the request sets among `names`; None when it sets
    none of them."""
    most: int | None = None
    for name in names:
        value = _cap(body, name)
        if value is not None and (most is None or value > most):
            most = value
    return most


def choices(kind: Kind | None, body: Mapping[str, Any]) -> int:
    """How many outputs the request may produce: the largest of its `n` and `best_of`, at
    least 1."""
    return max(1, _largest(body, _CHOICES[kind] if kind is not None else _ANY_CHOICES) or 1)


def tokens(
    kind: Kind | None, body: Mapping[str, Any], body_bytes: int, default_output: int
) -> tuple[int, int]:
    """(input, output) tokens the request may use at most. Output: the largest cap it sets of
    those its kind reads (every kind's in hook mode, where the path is not known), times its
    choices. Raises InvalidRequest (see the module)."""
    input_tokens = body_bytes // BYTES_PER_TOKEN + INPUT_OVERHEAD
    if kind is Kind.EMBEDDINGS:
        return input_tokens, 0
    cap = _largest(body, _CAPS[kind] if kind is not None else _ANY_CAPS)
    return input_tokens, (default_output if cap is None else cap) * choices(kind, body)
