from __future__ import annotations

import enum

import msgspec


class Kind(enum.Enum):
    CHAT = "chat"
    COMPLETIONS = "completions"
    RESPONSES = "responses"
    EMBEDDINGS = "embeddings"
    MESSAGES = "messages"

    # Hashed as the singletons they are: Enum's own __hash__ is a Python-level call (3x a dict
    # lookup's cost), and members key dicts on every request's path.
    __hash__ = object.__hash__


# Longest suffix first: "/chat/completions" must win over "/completions".
_SUFFIXES: tuple[tuple[str, Kind], ...] = (
    ("/chat/completions", Kind.CHAT),
    ("/completions", Kind.COMPLETIONS),
    ("/responses", Kind.RESPONSES),
    ("/embeddings", Kind.EMBEDDINGS),
    ("/messages", Kind.MESSAGES),
)


def kind_for_path(path: str) -> Kind | None:
    # A suffix match, so any mount point works: /v1/..., /openai/deployments/<name>/...
    trimmed = "/" + path.strip("/")
    for suffix, kind in _SUFFIXES:
        if trimmed.endswith(suffix):
            return kind
    return None


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    # Parts never exceed their wholes (extraction guarantees it):
    # cached_input_tokens + cache_write_tokens <= input_tokens, reasoning_tokens <= output_tokens.
    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cost_nanos: int | None = None
    model: str | None = None

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens
