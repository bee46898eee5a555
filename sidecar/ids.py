"""Request ids: ULIDs (https://github.com/ulid/spec), made for the request path.

`python-ulid` makes the same strings, but `str(ULID())` costs 4.0 us here against 1.3 (hot,
`timeit`), and about 12 us against 4 in a busy server (bench/RESULTS.md): it draws its
random part from the kernel each time and encodes in a loop. Here the random bits are drawn
from `os.urandom` for 64 ids at a time, each id takes its own 80 of them, and the 128 bits are
encoded ten at a time from a table. The strings are ULIDs as the library parses them
(tests/test_ids.py), random as unpredictably as the library's."""

from __future__ import annotations

import os
import time

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]  # every 10 bits, as two characters
_BATCH = 64
_RANDOM_BYTES = 10
_pool: list[int] = []


def _refill() -> None:
    drawn = os.urandom(_BATCH * _RANDOM_BYTES)
    _pool.extend(
        int.from_bytes(drawn[i : i + _RANDOM_BYTES], "big")
        for i in range(0, len(drawn), _RANDOM_BYTES)
    )


# A forked child must not make the ids its parent makes.
os.register_at_fork(after_in_child=_pool.clear)


def ulid(now_ms: int | None = None) -> str:
    """A new ULID: `now_ms` (this process's clock by default) and 80 random bits."""
    if not _pool:
        _refill()
    ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    v = (ms & 0xFFFF_FFFF_FFFF) << 80 | _pool.pop()
    p = _PAIRS
    return (
        p[v >> 120]
        + p[v >> 110 & 1023]
        + p[v >> 100 & 1023]
        + p[v >> 90 & 1023]
        + p[v >> 80 & 1023]
        + p[v >> 70 & 1023]
        + p[v >> 60 & 1023]
        + p[v >> 50 & 1023]
        + p[v >> 40 & 1023]
        + p[v >> 30 & 1023]
        + p[v >> 20 & 1023]
        + p[v >> 10 & 1023]
        + p[v & 1023]
    )
