"""What a request may use at most, from the request alone: reserved at admission against the
token and cost limits of a limited identity, replaced by the actual once it is answered.

Input: the request body's length in bytes / 3, plus 16. A token is rarely shorter than 3 bytes
of JSON (English runs about 4 characters a token; the body also holds keys, quotes and roles,
which are not tokens), so this over-estimates, which is the direction a reservation may err in;
token ids sent as numbers (`[1,2,3]`, two bytes a token) count one each on top.
Output: the request's own cap (`max_tokens`, `max_completion_tokens`, `max_output_tokens`), else
`[limits] default_output_reserve`, for each choice asked for (`n`; a completion's `best_of`, all of
which are generated and billed) of each prompt sent (a completion's `prompt` as a list); an
embedding produces none.

What the estimate reads must be a whole number (or null, or absent): anything else is refused
(400), not guessed at. An upstream that reads `"max_tokens": "100000"` or `"n": "128"` as numbers
(a lax parser: pydantic's, as many OpenAI-compatible servers use) would otherwise produce output
no reservation counted. A whole number written as a float (`64.0`) is read as that number."""

from __future__ import annotations

from collections.abc import Callable, Mapping
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
    if kind is None or name is None or names_output_cap(kind, body):
        return False
    body[name] = cap
    return True


def names_output_cap(kind: Kind | None, body: Mapping[str, Any]) -> bool:
    """Whether the request sets an output cap its kind reads (any kind's in hook mode, where the
    path is not known). Raises InvalidRequest (see the module)."""
    return _largest(body, _CAPS[kind] if kind is not None else _ANY_CAPS) is not None


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


def _parts(value: Any) -> tuple[int, int]:
    """(prompts, token ids) of a completion's `prompt` or an embedding's `input`: a string, a
    list of strings, a list of token ids, or a list of lists of token ids. Each element that is
    not a token id is a prompt of its own; a list of token ids alone is one."""
    if type(value) is not list:
        return 1, 0
    prompts = ids = 0
    for part in value:
        if type(part) is int:
            ids += 1
        else:
            prompts += 1
            if type(part) is list:
                ids += len(part)
    return max(1, prompts), ids


def tokens(
    kind: Kind | None, body: Mapping[str, Any], body_bytes: int, default_output: int
) -> tuple[int, int]:
    """(input, output) tokens the request may use at most. Output: the largest cap it sets of
    those its kind reads (every kind's in hook mode, where the path is not known), times its
    choices, times its prompts (a completion's `prompt` may be a list of them, each answered
    with its own choices). Input: its bytes (see the module), plus one for each token id it
    sends as a number: `[1,2,3]` is two bytes a token, which the bytes alone would count short.
    Raises InvalidRequest (see the module)."""
    input_tokens = body_bytes // BYTES_PER_TOKEN + INPUT_OVERHEAD
    if kind is Kind.CHAT or kind is Kind.MESSAGES or kind is Kind.RESPONSES:
        prompts = 1
    else:  # completions, embeddings, or the path not known (hook mode)
        prompts, ids = _parts(body.get("prompt"))
        if kind is not Kind.COMPLETIONS:
            ids += _parts(body.get("input"))[1]
        input_tokens += ids
        if kind is Kind.EMBEDDINGS:
            return input_tokens, 0
    cap = _largest(body, _CAPS[kind] if kind is not None else _ANY_CAPS)
    output = (default_output if cap is None else cap) * choices(kind, body) * prompts
    return input_tokens, output


# Tools the provider runs, which add what they find to the input (tool types, by prefix).
_HOSTED_TOOLS = ("file_search", "web_search", "web_fetch", "mcp", "code_interpreter")
_INLINE_SOURCES = ("base64", "text", "content")  # an Anthropic image's or document's


def opaque(kind: Kind | None, body: Mapping[str, Any]) -> bool:
    """Whether the request brings in input its bytes do not carry, so that its input estimate
    may fall short by any amount: an image or a file by URL or by id (inline data is counted by
    its bytes, which over-estimate it), the earlier turns or a stored prompt a Responses API
    request names, or a hosted tool (web or file search, MCP) that adds what it finds. `kind`
    None (hook mode, the path unknown): any kind's. On every limited request's path when
    [limits] opaque_input uses it: loops, not generators (a text-only chat in about 1 µs)."""
    if kind is Kind.EMBEDDINGS or kind is Kind.COMPLETIONS:
        return False
    if kind is not Kind.CHAT and (
        body.get("previous_response_id") is not None
        or body.get("conversation") is not None
        or isinstance(body.get("prompt"), dict)  # a stored prompt (a completion's is text)
        or body.get("mcp_servers")
    ):
        return True
    if (kind is None or kind is Kind.CHAT) and body.get("web_search_options") is not None:
        return True
    tools = body.get("tools")
    if type(tools) is list:
        for tool in tools:
            tool_type = tool.get("type") if type(tool) is dict else None
            if type(tool_type) is str and tool_type.startswith(_HOSTED_TOOLS):
                return True
    for name in ("messages", "input"):
        items = body.get(name)
        if type(items) is not list:
            continue
        for item in items:
            if type(item) is not dict:
                continue
            content = item.get("content")
            if type(content) is list:  # a message's parts
                for part in content:
                    if type(part) is dict and _refers(part):
                        return True
            elif _refers(item):  # a Responses input item of its own
                return True
    return False


def _refers(part: dict[str, Any]) -> bool:
    """Whether a content part (or a Responses input item) refers to input by URL or id."""
    check = _PARTS.get(part.get("type"))
    return check is not None and check(part)


def _image_url(part: dict[str, Any]) -> bool:  # chat: {"image_url": {"url": ...}}
    image = part.get("image_url")
    return not _inline(image.get("url") if isinstance(image, dict) else image)


def _file(part: dict[str, Any]) -> bool:  # chat: {"file": {"file_id": ...} or {"file_data": ...}}
    file = part.get("file")
    return not isinstance(file, dict) or file.get("file_data") is None


def _input_image(part: dict[str, Any]) -> bool:  # responses: image_url (a URL or data) or file_id
    return part.get("file_id") is not None or not _inline(part.get("image_url"))


def _input_file(part: dict[str, Any]) -> bool:  # responses: file_data, file_id or file_url
    return part.get("file_data") is None


def _source(part: dict[str, Any]) -> bool:  # anthropic: {"source": {"type": "base64", ...}}
    source = part.get("source")
    return not isinstance(source, dict) or source.get("type") not in _INLINE_SOURCES


_PARTS: dict[Any, Callable[[dict[str, Any]], bool]] = {
    "image_url": _image_url,
    "file": _file,
    "input_image": _input_image,
    "input_file": _input_file,
    "item_reference": lambda _: True,  # responses: an earlier item, by id
    "image": _source,
    "document": _source,
}


def _inline(url: Any) -> bool:
    """A data: URL: what it carries is in the request's bytes."""
    return isinstance(url, str) and url[:5].lower() == "data:"
