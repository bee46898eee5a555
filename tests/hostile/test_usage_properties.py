"""Usage extraction against whatever an upstream may send: never an exception, never a negative
count, and a stream's usage does not depend on where the network split it."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.usage import extract
from sidecar.usage.extract import (
    StreamUsage,
    cost_from_header,
    extract_json,
    usage_from_mapping,
)
from sidecar.usage.model import Kind, Usage
from tests.support import samples

BOUNDED = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

KINDS = st.sampled_from(list(Kind))

# What a JSON document may hold, floats with nan and inf included (msgspec encodes those as
# null, Python's json as bare NaN: both must be survived).
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=12)
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=16,
)
# The keys the readers take (the counts check_reported checks), and the costs.
USAGE_KEYS = [*extract._TOP_COUNTS, "cost", "total_cost"]
DETAIL_KEYS = list(extract._DETAILS)
COUNT = (
    st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats()
    | st.text(max_size=6)
    | st.none()
    | st.booleans()
)
# Usage objects with the real keys and hostile values: the shape the extractor looks into.
USAGE = st.dictionaries(
    st.sampled_from(USAGE_KEYS),
    COUNT,
    max_size=len(USAGE_KEYS),
) | st.builds(
    lambda top, details: {**top, **details},
    st.dictionaries(st.sampled_from(USAGE_KEYS), COUNT),
    st.dictionaries(
        st.sampled_from(DETAIL_KEYS),
        st.dictionaries(
            st.sampled_from(
                ["cached_tokens", "reasoning_tokens", "cache_write_tokens", "thinking_tokens"]
            ),
            COUNT,
        )
        | JSON,
    ),
)


def check(usage: Usage | None) -> None:
    """What every consumer of a Usage relies on."""
    if usage is None:
        return
    assert isinstance(usage, Usage)
    counts = (
        usage.input_tokens,
        usage.cached_input_tokens,
        usage.cache_write_tokens,
        usage.output_tokens,
        usage.reasoning_tokens,
    )
    assert all(type(n) is int and 0 <= n < 2**53 for n in counts), usage
    assert usage.cached_input_tokens + usage.cache_write_tokens <= usage.input_tokens, usage
    assert usage.reasoning_tokens <= usage.output_tokens, usage
    assert usage.cost_nanos is None or (type(usage.cost_nanos) is int and usage.cost_nanos >= 0)
    assert usage.model is None or (isinstance(usage.model, str) and usage.model)


def dumps(value: Any) -> tuple[bytes, bool]:
    """The document as JSON, or as Python writes it with NaN and Infinity (then not JSON)."""
    try:
        return json.dumps(value, allow_nan=False).encode(), True
    except ValueError:
        return json.dumps(value).encode(), False


@BOUNDED
@given(kind=KINDS, body=st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(kind: Kind, body: bytes) -> None:
    check(extract_json(kind, body))


@BOUNDED
@given(kind=KINDS, doc=JSON, usage=USAGE | JSON, model=JSON)
def test_arbitrary_json_never_raises(kind: Kind, doc: Any, usage: Any, model: Any) -> None:
    check(extract_json(kind, dumps(doc)[0]))
    body, strict = dumps({"model": model, "usage": usage, "choices": doc})
    found = extract_json(kind, body)
    check(found)
    if strict and isinstance(usage, dict):
        # A usage object is always read, whatever else the body holds.
        named = model if isinstance(model, str) and model else None
        assert found == usage_from_mapping(kind, usage, named)


@BOUNDED
@given(kind=KINDS, usage=USAGE)
def test_counts_are_never_negative(kind: Kind, usage: dict[str, Any]) -> None:
    check(usage_from_mapping(kind, usage, None))


@BOUNDED
@given(value=st.text(max_size=70) | st.from_regex(r"\s*-?[0-9.eE+_-]{0,30}\s*", fullmatch=True))
def test_header_cost_is_none_or_non_negative(value: str) -> None:
    nanos = cost_from_header(value)
    assert nanos is None or (type(nanos) is int and nanos >= 0)


def cuts(data: st.DataObject, stream: bytes) -> list[bytes]:
    """The stream split at arbitrary byte positions (empty pieces included)."""
    offsets = data.draw(
        st.lists(st.integers(min_value=0, max_value=len(stream)), max_size=12), label="cuts"
    )
    bounds = [0, *sorted(offsets), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


def run(kind: Kind, pieces: list[bytes], strip: bool) -> tuple[bytes, Usage | None]:
    stream = StreamUsage(kind, strip_usage_chunk=strip)
    out = []
    for piece in pieces:
        passes = stream.passes(piece)  # sent before it is read: given back as it is
        out.append(stream.feed(piece))
        assert out[-1] == piece or not passes
    out.append(stream.flush())
    usage = stream.finish()
    check(usage)
    return b"".join(out), usage


@BOUNDED
@given(kind=KINDS, strip=st.booleans(), blob=st.binary(max_size=400), data=st.data())
def test_arbitrary_streams_never_raise(
    kind: Kind, strip: bool, blob: bytes, data: st.DataObject
) -> None:
    out, _ = run(kind, cuts(data, blob), strip)
    if not strip:
        assert out == blob  # the client gets what the upstream sent, byte for byte


# Events an upstream sends, with hostile usage values among them.
def _event(payload: Any, name: str | None = None) -> bytes:
    head = f"event: {name}\n".encode() if name else b""
    return head + b"data: " + samples.dumps(payload) + b"\n\n"


EVENTS = st.one_of(
    st.sampled_from(
        [
            *samples.CHAT_EVENTS,
            *samples.COMPLETIONS_EVENTS,
            *samples.MESSAGES_SSE_EVENTS,
            samples.DONE,
            b": keep-alive\n\n",
            b"event: ping\ndata: {}\n\n",
            b"data: {not json\n\n",
            b"retry: 100\n\n",
        ]
    ),
    st.builds(lambda u: _event({"choices": [], "usage": u, "model": "m"}), USAGE),
    st.builds(lambda u: _event({"type": "message_start", "message": {"usage": u}}), USAGE),
    st.builds(lambda u: _event({"type": "message_delta", "usage": u}, "message_delta"), USAGE),
    st.builds(lambda u: _event({"type": "response.completed", "response": {"usage": u}}), USAGE),
    st.builds(lambda j: _event({"choices": j, "usage": None, "model": j}), JSON),
)
STREAMS = st.sampled_from(
    [
        (Kind.CHAT, samples.CHAT_STREAM),
        (Kind.CHAT, samples.CHAT_SPARSE_STREAM),
        (Kind.COMPLETIONS, samples.COMPLETIONS_STREAM),
        (Kind.RESPONSES, samples.RESPONSES_STREAM),
        (Kind.MESSAGES, samples.MESSAGES_STREAM),
    ]
)


@BOUNDED
@given(
    sample=STREAMS,
    newline=st.sampled_from([b"\n", b"\r\n", b"\r"]),
    strip=st.booleans(),
    data=st.data(),
)
def test_split_streams_give_the_usage_of_the_whole(
    sample: tuple[Kind, bytes], newline: bytes, strip: bool, data: st.DataObject
) -> None:
    kind, stream = sample
    # The samples' JSON has no raw newline (JSON escapes them), so this rewrites the framing only.
    stream = stream.replace(b"\n", newline)
    whole_out, whole = run(kind, [stream], strip)
    assert whole is not None and whole.total_tokens > 0
    assert run(kind, cuts(data, stream), strip) == (whole_out, whole)


@pytest.mark.slow
@BOUNDED
@given(
    kind=KINDS,
    events=st.lists(EVENTS, min_size=1, max_size=12),
    newline=st.sampled_from([b"\n", b"\r\n", b"\r"]),
    strip=st.booleans(),
    data=st.data(),
)
def test_generated_streams_split_anywhere_give_the_same_usage(
    kind: Kind, events: list[bytes], newline: bytes, strip: bool, data: st.DataObject
) -> None:
    stream = b"".join(events).replace(b"\n", newline)
    whole = run(kind, [stream], strip)
    assert run(kind, cuts(data, stream), strip) == whole
    if not strip:
        assert whole[0] == stream
