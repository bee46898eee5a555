"""The search index, the pure part: what is indexed, what a needle asks for, how the index's
strings decode. sidecar/identity/search.py reads the index; lua/ngram.lua writes it, in the
scripts that write the order set.

Search is a case-insensitive substring of the external id, display name or email, over the
order-set member's lower-case text (see records.order_member). The index keeps, per trigram
(3 bytes of UTF-8) of that text, the identities that contain it; each text field is indexed
with START before it, so that a two-byte needle at a field's start ends a trigram too.

Identities are numbered in the order they enter the index (their `seq`, kept at the end of
their order-set member). Per trigram and chunk of CHUNK seqs, a string holds the sorted
2-byte offsets (seq % CHUNK) of the identities with that trigram; each tag has postings too.
Per ID_BLOCK seqs, a string of 26-byte slots holds each seq's _id. A search intersects the
postings of the needle's rarest trigrams (a two-byte needle: the union of the trigrams that
end with it) and of its tags, then reads and checks the candidates' members in seq order.

Seq order is creation (_id) order except for identities that reach Redis out of order
(concurrent creates, clocks apart). The meta hash's `top` is the newest creation time indexed
so far and `late` the most any seq has been behind it, within LATE_MS; seqs further behind
are in the late set. So for every seq s outside the late set,
    ms(s) >= max(ms of every seq below s) - late,
which is what lets a walk in seq order return results in exact _id order (search.py)."""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

CHUNK = 65_536  # seqs per posting string and per id-slot string: offsets fit two bytes
SLOT = 26  # bytes per id slot: an _id
ID_BLOCK = 4_096  # id slots per string
LATE_MS = 250  # how far behind an arrival may be before it goes to the late set
START = "\3"  # before each text field (text carries no control characters)
TAG = b"\1"  # a tag's gram: this, then the tag
MAX_TRIGRAMS = 12  # of a long needle, this many (spread over it) narrow the candidates
CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

_SWAP = sys.byteorder == "little"


def lua_constants() -> str:
    return (
        f"local G_CHUNK = {CHUNK}\n"
        f"local G_ID_BLOCK = {ID_BLOCK}\n"
        f"local G_LATE_MS = {LATE_MS}\n"
        f"local G_START = '\\{ord(START)}'\n"
        f"local G_CROCKFORD = '{CROCKFORD}'\n"
    )


def field_trigrams(field: str) -> set[bytes]:
    """What ngram.lua indexes for one (lower-case) text field."""
    if not field:
        return set()
    raw = (START + field).encode()
    return {raw[i : i + 3] for i in range(len(raw) - 2)}


def member_grams(member: bytes) -> set[bytes]:
    """ngram.lua's g_grams: the trigrams of an order-set member's text fields, and its tags'
    grams."""
    stop = member.index(b"\1", 27)
    found: set[bytes] = set()
    for field in member[27:stop].split(b"\0"):
        found |= field_trigrams(field.decode())
    tags = member[stop + 1 :].partition(b"\2")[0]
    return found | {TAG + tag for tag in tags.split(b"\1") if tag}


@dataclass(frozen=True, slots=True)
class Plan:
    """What the index is asked: every one of `trigrams`, or for a two-byte needle any trigram
    that ends with `suffix`; and any of the `tags` grams, when the list is filtered by tags."""

    trigrams: tuple[bytes, ...] = ()
    suffix: bytes = b""
    tags: tuple[bytes, ...] = ()


def plan(needle: str, tags: Sequence[str] = ()) -> Plan | None:
    """None for what the index cannot narrow (a needle of one byte or none, without tags):
    the list is scanned instead."""
    tag_grams = tuple(dict.fromkeys(TAG + t.encode() for t in tags))
    raw = needle.encode()
    if len(raw) == 2:
        return Plan(suffix=raw, tags=tag_grams)
    if len(raw) < 3:
        return Plan(tags=tag_grams) if tag_grams else None
    grams = list(dict.fromkeys(raw[i : i + 3] for i in range(len(raw) - 2)))
    if len(grams) > MAX_TRIGRAMS:
        step = (len(grams) - 1) / (MAX_TRIGRAMS - 1)
        grams = [grams[round(i * step)] for i in range(MAX_TRIGRAMS)]
    return Plan(trigrams=tuple(grams), tags=tag_grams)


def key_part(gram: bytes) -> str:
    """How a gram names its posting strings: a trigram by its hex, a tag by a digest."""
    if gram.startswith(TAG):
        return "t" + hashlib.sha1(gram[1:], usedforsecurity=False).hexdigest()[:24]
    return gram.hex()


def offsets(data: bytes) -> array[int]:
    """A posting string's offsets (2-byte big-endian, sorted)."""
    found = array("H", data)
    if _SWAP:
        found.byteswap()
    return found


def member_seq(member: bytes) -> int | None:
    """The seq at the end of an order-set member, None when it is not indexed."""
    at = member.find(b"\2", 27)
    return int(member[at + 1 :]) if at >= 0 else None


def matches(member: bytes, needle: str, tags: Sequence[str]) -> bool:
    """Whether an order-set member matches a search: the needle inside one of its text fields
    (which end at the first \\1), and any of the tags (as scan.lua tests it)."""
    end = member.find(b"\1", 27)
    if needle and member.find(needle.encode(), 27, end) < 0:
        return False
    return not tags or any(f"\1{tag}\1".encode() in member[end:] for tag in tags)
