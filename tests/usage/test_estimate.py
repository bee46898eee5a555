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
        # Hook mode: the path is not known, so every kind's fields count.
        (None, {"max_output_tokens": 5000, "max_tokens": 10}, 5000),
        (None, {"max_tokens": 10, "best_of": 3, "n": 2}, 30),
    ],
)
def test_output_is_the_largest_cap_times_the_choices(
    kind: Kind | None, body: dict[str, Any], expected: int
) -> None:
    assert output(kind, body) == expected


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
