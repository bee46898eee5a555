"""What the search index is asked for a needle, and how its strings decode (pure)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.identity import ngram


def test_a_needle_of_three_bytes_or_more_asks_for_every_trigram() -> None:
    assert ngram.plan("smith") == ngram.Plan(trigrams=(b"smi", b"mit", b"ith"))
    assert ngram.plan("aaaa") == ngram.Plan(trigrams=(b"aaa",))  # each once
    assert ngram.plan("日") == ngram.Plan(trigrams=("日".encode(),))  # three bytes of UTF-8


def test_a_two_byte_needle_asks_for_the_trigrams_that_end_with_it() -> None:
    assert ngram.plan("ab") == ngram.Plan(suffix=b"ab")
    assert ngram.plan("é") == ngram.Plan(suffix="é".encode())


def test_an_empty_or_one_byte_needle_is_left_to_the_scan_unless_tags_narrow_it() -> None:
    assert ngram.plan("") is None
    assert ngram.plan("a") is None
    assert ngram.plan("a", ["gold", "gold"]) == ngram.Plan(tags=(b"\1gold",))
    assert ngram.plan("", ["gold"]) == ngram.Plan(tags=(b"\1gold",))
    assert ngram.plan("ab", ["x"]) == ngram.Plan(suffix=b"ab", tags=(b"\1x",))


def test_a_long_needle_asks_for_trigrams_spread_over_it() -> None:
    needle = "abcdefghijklmnopqrstuvwxyz0123456789"
    plan = ngram.plan(needle)
    assert plan is not None
    assert len(plan.trigrams) == ngram.MAX_TRIGRAMS
    assert plan.trigrams[0] == b"abc" and plan.trigrams[-1] == b"789"
    assert all(t in needle.encode() for t in plan.trigrams)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(text=st.text(max_size=12), at=st.integers(0, 12), size=st.integers(3, 6))
def test_a_substring_has_every_trigram_it_asks_for(text: str, at: int, size: int) -> None:
    """No false negatives: a field that contains the needle has all of the needle's trigrams
    (or, for a two-byte needle, one that ends with it)."""
    needle = text[at : at + size]
    plan = ngram.plan(needle)
    if plan is None:
        return
    grams = ngram.field_trigrams(text)
    if plan.suffix:
        assert any(g.endswith(plan.suffix) for g in grams)
    else:
        assert set(plan.trigrams) <= grams


def test_field_trigrams_start_with_a_marker() -> None:
    assert ngram.field_trigrams("ab") == {b"\3ab"}
    assert ngram.field_trigrams("abc") == {b"\3ab", b"abc"}
    assert ngram.field_trigrams("") == set()


def test_members_decode() -> None:
    member = b"01ARZ3NDEKTSV4RRFFQ69G5FAV\0ext\0john\0j@x.io\1gold\1\2" + b"70000"
    assert ngram.member_seq(member) == 70_000
    assert ngram.member_seq(member[: member.index(b"\2")]) is None
    assert ngram.member_grams(member) == (
        ngram.field_trigrams("ext")
        | ngram.field_trigrams("john")
        | ngram.field_trigrams("j@x.io")
        | {b"\1gold"}
    )
    assert ngram.matches(member, "ohn", ["gold"])
    assert not ngram.matches(member, "ohn", ["silver"])
    assert not ngram.matches(member, "extjohn", [])  # a match never spans two fields


def test_posting_strings_are_big_endian_offsets() -> None:
    assert list(ngram.offsets(b"\x00\x01\x01\x00\xff\xfe")) == [1, 256, 65534]
    assert list(ngram.offsets(b"")) == []
