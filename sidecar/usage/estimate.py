"""What a request may use at most, from the request alone: reserved at admission against the
token and cost limits of a limited identity, replaced by the actual once it is answered.

Input: the request body's length in bytes / 3, plus 16. A token is rarely shorter than 3 bytes
of JSON (English runs about 4 characters a token; the body also holds keys, quotes and roles,
which are not tokens), so this over-estimates, which is the direction a reservation may err in.
Output: the request's own cap (`max_tokens`, `max_completion_tokens`, `max_output_tokens`), else
`[limits] default_output_reserve`; an embedding produces none."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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


def _cap(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def tokens(
    kind: Kind | None, body: Mapping[str, Any], body_bytes: int, default_output: int
) -> tuple[int, int]:
    """(input, output) tokens the request may use at most."""
    input_tokens = body_bytes // BYTES_PER_TOKEN + INPUT_OVERHEAD
    if kind is Kind.EMBEDDINGS:
        return input_tokens, 0
    for name in _CAPS.get(kind or Kind.CHAT, ("max_tokens",)):
        value = _cap(body, name)
        if value is not None:
            return input_tokens, value
    return input_tokens, default_output
