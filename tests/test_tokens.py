"""Tokens compare equal exactly when they are equal, whatever their length or encoding."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sidecar.tokens import bearer, token_matches


def test_a_token_matches_only_itself() -> None:
    assert token_matches("s3cret-admin-token", "s3cret-admin-token")
    assert not token_matches("s3cret-admin-tokeN", "s3cret-admin-token")
    assert not token_matches("s3cret", "s3cret-admin-token")  # a prefix
    assert not token_matches("", "s3cret-admin-token")
    assert not token_matches(None, "s3cret-admin-token")
    assert not token_matches("s3cret-admin-token\udcff", "s3cret-admin-token")  # not UTF-8


@given(st.text(), st.text())
def test_tokens_match_exactly_when_equal(given_token: str, expected: str) -> None:
    expected = expected.encode("utf-8", "replace").decode("utf-8")
    assert token_matches(given_token, expected) is (given_token == expected)
    assert token_matches(expected, expected)


def test_bearer_tokens() -> None:
    assert bearer("Bearer abc ") == "abc"
    assert bearer("bearer abc") == "abc"
    assert bearer("Basic abc") is None
    assert bearer(None) is None
