from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import msgspec

MAX_CHUNKS = 10_000

_decode = msgspec.json.Decoder().decode


@dataclass(slots=True)
class MockOptions:
    latency_ms: float = 0.0
    fail_rate: float = 0.0
    seed: int | None = None
    chunks: int = 5
    chunk_delay_ms: float = 0.0
    cost: bool = False
    input_tokens: int | None = None
    output_tokens: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.fail_rate <= 1.0:
            raise ValueError("fail_rate must be between 0 and 1")
        if self.latency_ms < 0 or self.chunk_delay_ms < 0:
            raise ValueError("latency_ms and chunk_delay_ms must not be negative")
        if not 0 <= self.chunks <= MAX_CHUNKS:
            raise ValueError(f"chunks must be between 0 and {MAX_CHUNKS}")
        for value in (self.input_tokens, self.output_tokens):
            if value is not None and value < 0:
                raise ValueError("token counts must not be negative")


class RecordedRequest:
    """One request as it arrived. Header names are lower-cased; values are as sent."""

    __slots__ = ("_headers", "_maybe_controls", "_raw", "body", "method", "path", "query")

    def __init__(
        self, method: str, path: str, query: str, headers: list[tuple[str, str]], body: bytes
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.body = body
        self._headers: list[tuple[str, str]] | None = headers
        self._raw: list[tuple[bytes, bytes]] = []
        self._maybe_controls = True

    @classmethod
    def from_wire(
        cls,
        method: str,
        path: str,
        query: str,
        raw: list[tuple[bytes, bytes]],
        body: bytes,
        maybe_controls: bool,
    ) -> RecordedRequest:
        # Headers stay bytes until someone looks: decoding every header of every request
        # costs the benchmarks more than routing does.
        request = cls.__new__(cls)
        request.method = method
        request.path = path
        request.query = query
        request.body = body
        request._headers = None
        request._raw = raw
        request._maybe_controls = maybe_controls
        return request

    @property
    def headers(self) -> list[tuple[str, str]]:
        if self._headers is None:
            self._headers = [
                (name.decode("latin-1").lower(), value.decode("latin-1"))
                for name, value in self._raw
            ]
        return self._headers

    @property
    def maybe_controls(self) -> bool:
        """False when no header can be an x-mock-* control."""
        return self._maybe_controls

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def json(self) -> Any:
        return _decode(self.body)

    def controls(self) -> list[tuple[str, str]]:
        """The x-mock-* headers."""
        if not self._maybe_controls:
            return []
        if self._headers is not None:
            return [(k, v) for k, v in self._headers if k.startswith("x-mock-")]
        return [
            (name.decode("latin-1").lower(), value.decode("latin-1"))
            for name, value in self._raw
            if name[:7].lower() == b"x-mock-"
        ]

    def __repr__(self) -> str:
        return (
            f"RecordedRequest(method={self.method!r}, path={self.path!r}, "
            f"query={self.query!r}, headers={self.headers!r}, body={self.body!r})"
        )


class Stream(NamedTuple):
    head: list[bytes]  # SSE frames sent before the content
    content: list[bytes]  # one frame per content chunk
    tail: list[bytes]


@dataclass(slots=True)
class Reply:
    status: int
    headers: bytes  # rendered header lines, content-type included
    body: bytes = b""
    stream: Stream | None = None
    latency: float = 0.0
    chunk_delay: float = 0.0
    drop_after: int | None = None
