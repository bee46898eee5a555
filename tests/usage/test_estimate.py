"""What a request may use at most (usage/estimate.py): output per choice asked for, and the
fields read refused unless they are whole numbers."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.errors import InvalidRequest
from sidecar.usage import estimate
from sidecar.usage.model import Kind

DEFAULT = 1000


def output(kind: Kind | None, body: dict[str, Any]) -> int:
    return estimate.tokens(kind, body, 300, DEFAULT)[1]


def test_input_is_the_bytes_over_three_plus_overhead() -> None:
    assert estimate.tokens(Kind.CHAT, {}, 300, DEFAULT) == (300 // 3 + 16, DEFAULT)
    assert estimate.tokens(Kind.EMBEDDINGS, {"n": 5}, 30, DEFAULT) == (26, 0)


@pytest.mark.parametrize(
    ("kind", "body", "expected"),
    [
        (Kind.CHAT, {"max_tokens": 50}, 50),
        (Kind.CHAT, {"max_tokens": 50, "n": 4}, 200),
        (Kind.CHAT, {"n": 3}, 3 * DEFAULT),  # no cap: the default, per choice
        (Kind.CHAT, {"max_completion_tokens": 20, "max_tokens": 70}, 70),  # the larger
        (Kind.CHAT, {"max_tokens": 50, "best_of": 9}, 50),  # not a chat field
        (Kind.COMPLETIONS, {"max_tokens": 10, "n": 2, "best_of": 5}, 50),  # all generated
        (Kind.COMPLETIONS, {"max_tokens": 10, "n": 3}, 30),
        (Kind.RESPONSES, {"max_output_tokens": 40, "n": 8}, 40),  # no choices there
        (Kind.MESSAGES, {"max_tokens": 40}, 40),
        (Kind.CHAT, {"max_tokens": 50, "n": 0}, 50),  # at least one
        (Kind.CHAT, {"max_tokens": None, "n": None}, DEFAULT),  # null: not set
        (Kind.CHAT, {"max_tokens": 64.0, "n": 2.0}, 128),  # whole numbers as floats
        # A completion's prompts, each with its own choices (a list of token ids is one).
        (Kind.COMPLETIONS, {"max_tokens": 10, "prompt": ["a", "b", "c"]}, 30),
        (Kind.COMPLETIONS, {"max_tokens": 10, "n": 2, "prompt": [[1, 2], [3]]}, 40),
        (Kind.COMPLETIONS, {"max_tokens": 10, "prompt": [1, 2, 3]}, 10),
        (Kind.COMPLETIONS, {"max_tokens": 10, "prompt": "a"}, 10),
        (Kind.COMPLETIONS, {"max_tokens": 10, "prompt": []}, 10),
        (Kind.CHAT, {"max_tokens": 10, "prompt": ["a", "b"]}, 10),  # not a chat field
        # Hook mode: the path is not known, so every kind's fields count.
        (None, {"max_output_tokens": 5000, "max_tokens": 10}, 5000),
        (None, {"max_tokens": 10, "best_of": 3, "n": 2}, 30),
        (None, {"max_tokens": 10, "prompt": ["a", "b"]}, 20),
        (None, {"max_output_tokens": 10, "prompt": {"id": "pmpt_1"}}, 10),  # a stored prompt
    ],
)
def test_output_is_the_largest_cap_times_the_choices(
    kind: Kind | None, body: dict[str, Any], expected: int
) -> None:
    assert output(kind, body) == expected


@pytest.mark.parametrize(
    ("kind", "body", "ids"),
    [
        (Kind.COMPLETIONS, {"prompt": [1] * 90}, 90),
        (Kind.COMPLETIONS, {"prompt": [[1] * 40, [2] * 50, "text"]}, 90),
        (Kind.EMBEDDINGS, {"input": [[1] * 60, [2] * 30]}, 90),
        (Kind.EMBEDDINGS, {"input": [1] * 90}, 90),
        (None, {"input": [1] * 40, "prompt": [2] * 50}, 90),
        (Kind.CHAT, {"prompt": [1] * 90}, 0),  # not read there
        (Kind.EMBEDDINGS, {"input": ["a", "b"]}, 0),
    ],
)
def test_token_ids_sent_as_numbers_count_one_each_beside_the_bytes(
    kind: Kind | None, body: dict[str, Any], ids: int
) -> None:
    """`[1,1,1]` is two bytes a token: the bytes over three alone would count it short."""
    assert estimate.tokens(kind, body, 300, DEFAULT)[0] == 300 // 3 + 16 + ids


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens", "n"])
@pytest.mark.parametrize("value", ["100000", "128", True, -1, 2.5, float("inf"), [4], {"x": 1}])
def test_a_field_read_that_is_not_a_whole_number_is_refused(field: str, value: Any) -> None:
    with pytest.raises(InvalidRequest) as raised:
        output(Kind.CHAT, {"max_tokens": 10, field: value})
    assert raised.value.param == field
    assert raised.value.status == 400


def test_cap_output_leaves_a_request_with_a_cap_alone_and_caps_one_without() -> None:
    capped: dict[str, Any] = {"max_tokens": 5, "n": 3}
    assert not estimate.cap_output(Kind.CHAT, capped, 100)
    bare: dict[str, Any] = {"n": 3}
    assert estimate.cap_output(Kind.CHAT, bare, 100)
    assert bare == {"n": 3, "max_completion_tokens": 100}  # per choice, as reserved


def _user(*parts: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": ["Look:", *parts]}]}


PNG = "data:image/png;base64,iVBORw0KGgo="


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        (Kind.CHAT, _user({"type": "image_url", "image_url": {"url": "https://x.test/a.png"}})),
        (Kind.CHAT, _user({"type": "file", "file": {"file_id": "file-abc"}})),
        (Kind.CHAT, {"messages": [], "web_search_options": {}}),
        (Kind.RESPONSES, {"input": "and then?", "previous_response_id": "resp_1"}),
        (Kind.RESPONSES, {"input": "hi", "conversation": "conv_1"}),
        (Kind.RESPONSES, {"prompt": {"id": "pmpt_1"}}),
        (Kind.RESPONSES, {"input": "news?", "tools": [{"type": "web_search_preview"}]}),
        (Kind.RESPONSES, {"input": "q", "tools": [{"type": "file_search"}]}),
        (
            Kind.RESPONSES,
            {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
        ),
        (
            Kind.RESPONSES,
            {"input": [{"type": "input_file", "file_url": "https://x.test/a.pdf"}]},
        ),
        (Kind.RESPONSES, {"input": [{"type": "item_reference", "id": "msg_1"}]}),
        (
            Kind.MESSAGES,
            _user({"type": "image", "source": {"type": "url", "url": "https://x.test/a.png"}}),
        ),
        (Kind.MESSAGES, _user({"type": "document", "source": {"type": "file", "file_id": "f"}})),
        (Kind.MESSAGES, {"messages": [], "tools": [{"type": "web_search_20250305"}]}),
        (Kind.MESSAGES, {"messages": [], "mcp_servers": [{"url": "https://mcp.test"}]}),
        # Hook mode (the path unknown): any kind's.
        (None, {"input": "x", "previous_response_id": "resp_1"}),
        (None, _user({"type": "image_url", "image_url": {"url": "https://x.test/a.png"}})),
    ],
)
def test_input_referred_to_by_url_id_or_hosted_tool_is_opaque(
    kind: Kind | None, body: dict[str, Any]
) -> None:
    assert estimate.opaque(kind, body)


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        (Kind.CHAT, {"messages": [{"role": "user", "content": "plain text"}]}),
        (Kind.CHAT, _user({"type": "text", "text": "more"})),
        # Inline data is in the request's bytes, which over-estimate it.
        (Kind.CHAT, _user({"type": "image_url", "image_url": {"url": PNG}})),
        (Kind.CHAT, _user({"type": "file", "file": {"file_data": PNG}})),
        (Kind.CHAT, _user({"type": "input_audio", "input_audio": {"data": "UklG"}})),
        (Kind.CHAT, {"messages": [], "tools": [{"type": "function", "function": {"name": "f"}}]}),
        (Kind.RESPONSES, {"input": "hi", "previous_response_id": None}),
        (Kind.RESPONSES, {"input": [{"type": "input_image", "image_url": PNG}]}),
        (Kind.MESSAGES, _user({"type": "image", "source": {"type": "base64", "data": "iVBO"}})),
        (Kind.MESSAGES, _user({"type": "document", "source": {"type": "text", "data": "a"}})),
        (Kind.EMBEDDINGS, {"input": "https://x.test/a.png"}),
        (Kind.COMPLETIONS, {"prompt": "p"}),
        (None, {"prompt": "a completion's prompt, in hook mode"}),
    ],
)
def test_input_carried_in_the_request_is_not_opaque(
    kind: Kind | None, body: dict[str, Any]
) -> None:
    assert not estimate.opaque(kind, body)
