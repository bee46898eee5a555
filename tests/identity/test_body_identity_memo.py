"""Body identities are parsed once per distinct object: the same object again is the same
result, a bad one is refused every time, and the memo stays bounded."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from sidecar.identity import resolve as resolving
from sidecar.identity.model import InvalidField
from sidecar.identity.resolve import Resolved, Source, resolve


@pytest.fixture(autouse=True)
def empty_memo() -> Iterator[None]:
    resolving._PARSED.clear()
    yield
    resolving._PARSED.clear()


def body_with(identity: Any) -> dict[str, Any]:
    return {"model": "m", "identity": identity}


def run(body: dict[str, Any]) -> Resolved:
    return resolve(body, {}, header="x-id", grant_for=lambda digest: None, required=False)


def test_the_same_identity_object_is_parsed_once_and_stays_as_it_was_given() -> None:
    tags = ["a", "b"]
    sent: dict[str, Any] = {"id": " ann ", "display_name": "Ann", "tags": tags, "metadata": {}}
    first = run(body_with(dict(sent)))
    assert first.external_id == "ann" and first.source is Source.BODY
    assert first.profile is not None and first.profile.tags == ["a", "b"]
    again = dict(sent)
    second = run(body_with(again))
    assert second == first
    assert second.profile is first.profile  # from the memo, not checked again
    tags.append("c")  # what the client's object becomes later changes nothing kept
    assert first.profile.tags == ["a", "b"]
    other = run(body_with({**sent, "display_name": "Ann B."}))  # another object: its own
    assert other.profile is not None and other.profile.display_name == "Ann B."


def test_a_bad_identity_is_refused_every_time_and_never_kept() -> None:
    for _ in range(2):
        with pytest.raises(InvalidField) as refused:
            run(body_with({"id": "ann", "email": "not an address"}))
        assert refused.value.param == "identity.email"
    assert not resolving._PARSED


def test_the_memo_is_bounded_in_count_and_in_size() -> None:
    large = {"id": "big", "metadata": {f"k{n}": "v" * 500 for n in range(10)}}
    assert run(body_with(large)).external_id == "big"
    assert not resolving._PARSED  # over PARSED_BYTES: parsed, not kept
    for n in range(resolving.PARSED_MAX):
        run(body_with({"id": f"user-{n}"}))
    assert len(resolving._PARSED) == resolving.PARSED_MAX
    run(body_with({"id": "one-more"}))
    assert len(resolving._PARSED) == 1  # emptied when full, then kept
