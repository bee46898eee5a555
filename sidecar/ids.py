"""Request ids: ULIDs (https://github.com/ulid/spec), made for the request path.

`python-ulid` makes the same strings, but `str(ULID())` costs 4.0 us here against 0.5-1.4
(hot, `timeit`), and about 12 us against 4 in a busy server (bench/RESULTS.md): it draws its
random part from the kernel each time and encodes in a Python loop. Here the random bits are
drawn from `os.urandom` for 64 ids at a time and encoded at once by `base64.b32encode` (80 bits
are exactly 16 base32 characters; RFC 4648's alphabet mapped to Crockford's), and the 48-bit
time part is encoded once per millisecond. The strings are ULIDs as the library parses them
(tests/test_ids.py), random as unpredictably as the library's."""

from __future__ import annotations

import base64
import os
import time

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]  # every 10 bits, as two characters
_RFC_TO_CROCKFORD = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _CROCKFORD.encode())
_BATCH = 64
_RANDOM_BYTES = 10  # 80 bits: 16 characters
_pool: list[str] = []  # random parts, encoded
_time = (-1, "")  # the last millisecond encoded, and its 10 characters


def random_parts(drawn: bytes) -> list[str]:
    """The encoded random parts of len(drawn) // 10 ids."""
    text = base64.b32encode(drawn).translate(_RFC_TO_CROCKFORD).decode("ascii")
    return [text[i : i + 16] for i in range(0, len(text), 16)]


# A forked child must not make the ids its parent makes.
os.register_at_fork(after_in_child=_pool.clear)


def ulid(now_ms: int | None = None) -> str:
    """A new ULID: `now_ms` (this process's clock by default) and 80 random bits."""
    if not _pool:
        _pool.extend(random_parts(os.urandom(_BATCH * _RANDOM_BYTES)))
    ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms & 0xFFFF_FFFF_FFFF
    global _time
    last, prefix = _time
    if ms != last:
        prefix = time_part(ms)
        _time = (ms, prefix)
    return prefix + _pool.pop()


def time_part(ms: int) -> str:
    """The first 10 characters of every ULID made in millisecond `ms` (48 bits): ULIDs sort by
    them."""
    p = _PAIRS
    return p[ms >> 40] + p[ms >> 30 & 1023] + p[ms >> 20 & 1023] + p[ms >> 10 & 1023] + p[ms & 1023]
