from __future__ import annotations

import re
from typing import Any, NamedTuple

import msgspec

from sidecar import money
from sidecar.errors import InvalidRequest
from sidecar.usage.model import Kind, Usage

# A count above this is garbage rather than usage; it also keeps sums exact and far from int64.
_MAX_COUNT = 2**53 - 1
# Whatever the upstream sends, a decode failure of any of these kinds means "no usage here".
_DECODE_ERRORS = (msgspec.MsgspecError, ValueError, RecursionError)


class _Garbled(Exception):
    """A count a usage object's reader takes that is not one (see usage_from_mapping)."""


def _count(value: object) -> int:
    """A count read (null is none: 0); _Garbled for anything but a whole number from 0 to
    _MAX_COUNT."""
    if type(value) is int:
        if 0 <= value <= _MAX_COUNT:
            return value
    elif value is None:
        return 0
    # Some gateways serialise counts as 12.0; is_integer() is False for nan and inf.
    elif type(value) is float and value.is_integer() and 0 <= value <= _MAX_COUNT:
        return int(value)
    raise _Garbled


# The counts a usage object's readers below take, at its top level and in its detail objects
# (every name there that ends in `_tokens`, and cache_creation's counts by TTL).
_TOP_COUNTS = (
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "prompt_cache_hit_tokens",
)
_DETAILS = (
    "prompt_tokens_details",
    "completion_tokens_details",
    "input_tokens_details",
    "output_tokens_details",
    "cache_creation",
)


def check_reported(raw: dict[str, Any], param: str = "usage") -> None:
    """Raise InvalidRequest naming the first count in a usage object a caller reports (hook
    mode) that is not a whole number from 0 to 2**53 - 1 (null is absent), a detail object that
    is not an object, or a cost that is not a non-negative number of dollars: a report is
    refused, counting nothing, so that a garbled one cannot release its request's reservation
    as if it had used nothing."""
    bad = unreadable(raw)
    if bad is not None:
        what = "an object" if bad in _DETAILS else "a whole number from 0 to 2**53 - 1"
        raise InvalidRequest(f"{param}.{bad} must be {what}", param=f"{param}.{bad}")
    for name in ("cost", "total_cost"):
        value = raw.get(name)
        if value is not None and money.from_number(value) is None:
            message = f"{param}.{name} must be a non-negative number of dollars"
            raise InvalidRequest(message, param=f"{param}.{name}")


def unreadable(raw: dict[str, Any]) -> str | None:
    """The first count a usage object holds that is not a whole number from 0 to 2**53 - 1
    (null is absent), or detail object that is not an object, by its path; None when every one
    it holds can be read."""
    for name in _TOP_COUNTS:
        value = raw.get(name)
        if value is not None and not _is_count(value):
            return name
    for group in _DETAILS:
        details = raw.get(group)
        if details is None:
            continue
        if type(details) is not dict:
            return group
        for name, value in details.items():
            if name.endswith("_tokens") and value is not None and not _is_count(value):
                return f"{group}.{name}"
    return None


def _is_count(value: object) -> bool:
    try:
        _count(value)
    except _Garbled:
        return False
    return True


def _mapping(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _model_name(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _usage(
    *,
    input_tokens: int,
    cached: int,
    cache_write: int,
    output_tokens: int,
    reasoning: int,
    raw: dict[str, Any],
    model: str | None,
) -> Usage:
    # Parts never exceed their whole, so downstream arithmetic (and genai-prices, which rejects
    # such usage) can rely on it even when an upstream reports nonsense.
    cached = min(cached, input_tokens)
    cache_write = min(cache_write, input_tokens - cached)
    cost = money.from_number(raw.get("cost"))
    if cost is None:
        cost = money.from_number(raw.get("total_cost"))
    return Usage(
        input_tokens=input_tokens,
        cached_input_tokens=cached,
        cache_write_tokens=cache_write,
        output_tokens=output_tokens,
        reasoning_tokens=min(reasoning, output_tokens),
        cost_nanos=cost,
        model=model,
    )


def _from_chat(raw: dict[str, Any], model: str | None) -> Usage:
    prompt = _mapping(raw.get("prompt_tokens_details"))
    completion = _mapping(raw.get("completion_tokens_details"))
    # LiteLLM also reports Anthropic-style cache fields at the top level of a chat usage object,
    # DeepSeek its own; prompt_tokens includes them in both.
    cached = (
        _count(prompt.get("cached_tokens"))
        or _count(raw.get("cache_read_input_tokens"))
        or _count(raw.get("prompt_cache_hit_tokens"))
    )
    write = _count(prompt.get("cache_write_tokens")) or _count(
        raw.get("cache_creation_input_tokens")
    )
    return _usage(
        input_tokens=_count(raw.get("prompt_tokens")),
        cached=cached,
        cache_write=write,
        output_tokens=_count(raw.get("completion_tokens")),
        reasoning=_count(completion.get("reasoning_tokens")),
        raw=raw,
        model=model,
    )


def _from_responses(raw: dict[str, Any], model: str | None) -> Usage:
    details_in = _mapping(raw.get("input_tokens_details"))
    details_out = _mapping(raw.get("output_tokens_details"))
    return _usage(
        input_tokens=_count(raw.get("input_tokens")),
        cached=_count(details_in.get("cached_tokens")),
        cache_write=_count(details_in.get("cache_write_tokens")),
        output_tokens=_count(raw.get("output_tokens")),
        reasoning=_count(details_out.get("reasoning_tokens")),
        raw=raw,
        model=model,
    )


def _from_anthropic(raw: dict[str, Any], model: str | None) -> Usage:
    # Anthropic's input_tokens excludes both cache reads and cache writes.
    uncached = _count(raw.get("input_tokens"))
    read = _count(raw.get("cache_read_input_tokens"))
    write = _count(raw.get("cache_creation_input_tokens"))
    if not write:
        by_ttl = _mapping(raw.get("cache_creation"))
        write = sum(_count(value) for name, value in by_ttl.items() if name.endswith("_tokens"))
    return _usage(
        input_tokens=uncached + read + write,
        cached=read,
        cache_write=write,
        output_tokens=_count(raw.get("output_tokens")),
        reasoning=_count(_mapping(raw.get("output_tokens_details")).get("thinking_tokens")),
        raw=raw,
        model=model,
    )


def usage_from_mapping(
    kind: Kind, raw: dict[str, Any], model: str | None, *, output: bool | None = None
) -> Usage | None:
    """The usage an object tells; None when it cannot be read: a count its reader takes that
    is not one (a string, a fraction, a negative, a number past 2**53), no input or output
    count at all (`{}`, a total alone), or, where `output` (by default: for every kind but an
    embedding, which produces none), no output count. Such an answer is one whose usage is not
    known, charged what it reserved and counted as unreported (Meter.charges), not a free one."""
    told_output = raw.get("completion_tokens") is not None or raw.get("output_tokens") is not None
    if not told_output and (
        (kind is not Kind.EMBEDDINGS if output is None else output)
        or (raw.get("prompt_tokens") is None and raw.get("input_tokens") is None)
    ):
        return None
    # The usage object's own keys decide its shape first: a gateway may answer an Anthropic-style
    # path with an OpenAI-shaped body or the reverse. The kind settles the ambiguous cases.
    chat_shaped = "prompt_tokens" in raw or "completion_tokens" in raw
    io_shaped = "input_tokens" in raw or "output_tokens" in raw
    try:
        if chat_shaped and not io_shaped:
            return _from_chat(raw, model)
        if (
            kind is Kind.MESSAGES
            or "cache_read_input_tokens" in raw
            or ("cache_creation_input_tokens" in raw)
        ):
            return _from_anthropic(raw, model)
        return _from_responses(raw, model)
    except _Garbled:
        return None


class _Body(msgspec.Struct):
    # Only the fields we read; msgspec skips the rest (choices, output, data) without building them.
    usage: Any = None
    model: Any = None


_body_decoder = msgspec.json.Decoder(_Body)


def extract_json(kind: Kind, body: bytes) -> Usage | None:
    try:
        doc = _body_decoder.decode(body)
    except _DECODE_ERRORS:
        return None
    if not isinstance(doc.usage, dict):
        return None
    return usage_from_mapping(kind, doc.usage, _model_name(doc.model))


class Unread(NamedTuple):
    """A JSON answer's body (status below 400) whose usage is read once the client has the
    answer, with other requests' (see Recorder.later)."""

    kind: Kind
    body: bytes


def read(usage: Usage | Unread | None) -> Usage | None:
    """The usage, read from the body when it was left unread."""
    return extract_json(usage.kind, usage.body) if isinstance(usage, Unread) else usage


def cost_from_header(value: str | None) -> int | None:
    """`x-litellm-response-cost`: dollars as a plain decimal."""
    return money.from_text(value)


def prepare_request(kind: Kind, body: dict[str, Any]) -> bool:
    """Ask a chat or completions stream for its usage (`stream_options.include_usage`, which
    OpenAI's streams carry only when asked); True when the body changed. Raises InvalidRequest
    (400) for a `stream` that is not true, false or null, and for a stream's `stream_options`
    that is not an object or null: a lax server (pydantic's, LiteLLM's truth test) streams on
    `"stream": "true"` or `1`, and drops options it cannot read, and the stream would then come
    without its usage, whose tokens and cost the sidecar could not count."""
    stream = body.get("stream")
    if stream is not None and type(stream) is not bool:
        raise InvalidRequest("'stream' must be true or false", param="stream")
    if kind not in (Kind.CHAT, Kind.COMPLETIONS) or stream is not True:
        return False
    options = body.get("stream_options")
    if options is None:
        body["stream_options"] = {"include_usage": True}
        return True
    if type(options) is not dict:
        raise InvalidRequest("'stream_options' must be an object", param="stream_options")
    if options.get("include_usage") is True:
        return False
    options["include_usage"] = True
    return True


class _Inner(msgspec.Struct):
    usage: Any = None
    model: Any = None


class _Event(msgspec.Struct):
    # message: Anthropic message_start; response: the Responses API events. Typed as structs so a
    # response.completed event does not build its whole output just to reach the usage.
    usage: Any = None
    model: Any = None
    choices: Any = None
    message: _Inner | None = None
    response: _Inner | None = None


_event_decoder = msgspec.json.Decoder(_Event)

# A blank line ends an event. Line ends are \r\n, \n or a lone \r.
_EVENT_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")
# Whole-buffer endings that certainly finish an event, checked before reaching for the regex.
_CERTAIN_ENDS = (b"\n\n", b"\r\n\r\n")
# What may follow a "usage" key whose value is not null.
_LIVE_VALUE = re.compile(rb"\s*:\s*+(?!null)")
# An unterminated event larger than this is not one we can use; stop buffering it.
_MAX_HOLD = 16 * 1024 * 1024
# Give up looking for a model name after this many events that mention one but do not parse.
_MODEL_TRIES = 3


def _event_data(block: bytes) -> bytes | None:
    if b"\r" in block:
        block = block.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    parts: list[bytes] = []
    for line in block.split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
        elif line == b"data":
            parts.append(b"")
    if not parts:
        return None
    data = parts[0] if len(parts) == 1 else b"\n".join(parts)
    return None if data == b"[DONE]" else data


class StreamUsage:
    """Watches an SSE response for usage; optionally drops the usage-only chunk we asked for."""

    __slots__ = ("_hold", "_kind", "_later", "_model", "_model_tries", "_raw", "_seen", "_strip")

    def __init__(self, kind: Kind, *, strip_usage_chunk: bool = False) -> None:
        self._kind = kind
        # Only chat and completions streams have a usage chunk that the sidecar adds.
        self._strip = strip_usage_chunk and kind in (Kind.CHAT, Kind.COMPLETIONS)
        # Bytes of an event whose terminating blank line has not arrived yet.
        self._hold = b""
        self._raw: dict[str, Any] = {}
        self._seen = False
        self._model: str | None = None
        self._model_tries = 0
        # Events that name a model but carry no usage: read at the end, and only when no event
        # with usage named one (most do), not while the answer streams to the client.
        self._later: list[bytes] = []

    def passes(self, chunk: bytes) -> bool:
        """Whether `feed(chunk)` would give `chunk` back as it is (nothing held before it, it
        ends an event, and no usage chunk in it to drop): it can then go to the client before
        it is read (a stream's first bytes do not wait for it)."""
        return not self._strip or (
            not self._hold and chunk.endswith(_CERTAIN_ENDS) and not _live_usage(chunk)
        )

    def feed(self, chunk: bytes) -> bytes:
        hold = self._hold
        buf = hold + chunk if hold else chunk
        if buf.endswith(_CERTAIN_ENDS):
            complete = buf
            self._hold = b""
        else:
            # The hold has no event end in it, so only its last few bytes can start one.
            end = _last_event_end(buf, max(0, len(hold) - 3))
            complete = buf[:end]
            self._hold = buf[end:]
        if not self._strip:
            if complete:
                self._scan(complete, final=False)
            if len(self._hold) > _MAX_HOLD:
                self._hold = b""
            return chunk
        out = self._scan(complete, final=False) if complete else b""
        if len(self._hold) > _MAX_HOLD:
            # Too big to be a usage chunk: pass it on rather than hold the client up.
            out += self._hold
            self._hold = b""
        return out

    def flush(self) -> bytes:
        """Bytes held back at the end of the stream (strip mode only holds any)."""
        tail, self._hold = self._hold, b""
        if not tail:
            return b""
        # The stream is over: a last event without its blank line still counts if it parses.
        out = self._scan(tail, final=True)
        return out if self._strip else b""

    def finish(self) -> Usage | None:
        # In strip mode, call flush() first and forward what it returns.
        self.flush()
        while self._model is None and self._later:
            self._take(self._later.pop(0))
        if not self._seen:
            return None
        return usage_from_mapping(self._kind, self._raw, self._model)

    def _wants(self, data: bytes) -> bool:
        if _live_usage(data):
            return True
        return (
            self._model is None
            and self._model_tries + len(self._later) < _MODEL_TRIES
            and b'"model"' in data
        )

    def _look(self, block: bytes) -> bool:
        """One whole event: read now when it carries usage, kept for `finish` when it only
        names a model. True when it is a usage-only chunk to drop."""
        if _live_usage(block):
            return self._take(block)
        if self._wants(block):
            self._later.append(block)
        return False

    def _scan(self, buf: bytes, *, final: bool) -> bytes:
        if not self._wants(buf):
            return buf
        kept: list[bytes] = []
        dropped = False
        start = 0
        for match in _EVENT_END.finditer(buf):
            block = buf[start : match.end()]
            start = match.end()
            if self._look(block):
                dropped = True
            else:
                kept.append(block)
        if final and start < len(buf):
            block = buf[start:]
            if self._look(block):
                dropped = True
            else:
                kept.append(block)
        return b"".join(kept) if dropped else buf

    def _take(self, block: bytes) -> bool:
        """Records what the event says; True when it is a usage-only chunk to drop."""
        data = _event_data(block)
        if data is None:
            return False
        try:
            event = _event_decoder.decode(data)
        except _DECODE_ERRORS:
            if self._model is None:
                self._model_tries += 1
            return False
        message, response = event.message, event.response
        for model in (
            event.model,
            message.model if message is not None else None,
            response.model if response is not None else None,
        ):
            if isinstance(model, str) and model:
                self._model = model
        if self._model is None:
            self._model_tries += 1
        for usage in (
            event.usage,
            message.usage if message is not None else None,
            response.usage if response is not None else None,
        ):
            if isinstance(usage, dict):
                self._seen = True
                # Anthropic's message_delta repeats some fields as null and updates others:
                # the latest non-null value of each field is the current one.
                for key, value in usage.items():
                    if value is not None:
                        self._raw[key] = value
        return (
            self._strip
            and isinstance(event.usage, dict)
            and (event.choices is None or event.choices == [])
        )


def _live_usage(data: bytes) -> bool:
    # OpenAI sends "usage":null in every chunk once usage is on; only a non-null one is worth
    # decoding. Quotes inside JSON strings are escaped, so "usage" then a colon is always a key.
    at = data.find(b'"usage"')
    while at >= 0:
        at += 7
        if not data.startswith(b":null", at) and _LIVE_VALUE.match(data, at):
            return True
        at = data.find(b'"usage"', at)
    return False


def _last_event_end(buf: bytes, start: int) -> int:
    # A trailing \r may be the first half of \r\n: leave it out until the next byte arrives.
    endpos = len(buf) - 1 if buf.endswith(b"\r") else len(buf)
    end = 0
    for match in _EVENT_END.finditer(buf, start, endpos):
        end = match.end()
    return end
