from __future__ import annotations

import pytest

from sidecar.quota import windows
from sidecar.quota.policy import Dimension, parse_limit


def test_windows_arithmetic() -> None:
    minute = parse_limit(Dimension.REQUESTS, "20/minute")
    # 10 in the previous minute, 15 in this one, 30 s in: 10 * 0.5 + 15 = 20 used: full.
    assert windows.used(minute, 10, 15, 30_000) == 20
    assert not windows.admits(minute, 10, 15, 30_000)
    # It admits once the previous minute's weight falls by one request: 6 s later.
    assert windows.wait_ms(minute, 10, 15, 30_000, 30_000) == 6000
    # 25 in this minute: wait for the next, until 25 * (1 - s/60) <= 19: s = 14.4 s.
    assert windows.wait_ms(minute, 0, 25, 30_000, 30_000) == 30_000 + 14_400
    day = parse_limit(Dimension.COST, "1/day")
    assert windows.wait_ms(day, 0, 10**9, 5_000, 86_395_000) == 86_395_000
    assert windows.admits(day, 0, 10**9 - 1, 0) and not windows.admits(day, 0, 10**9, 0)
    assert windows.bucket(day, 1_795_000_000_000)[0] == "20261118"
    month = parse_limit(Dimension.COST, "1/month")
    name, _, elapsed, left = windows.bucket(month, 1_795_000_000_000)
    assert name == "202611"
    assert elapsed + left == 30 * 86_400_000


@pytest.mark.parametrize(
    ("ms", "text"),
    [(20, "20ms"), (1000, "1s"), (1500, "1.5s"), (360_000, "6m0s"), (3_723_000, "1h2m3s")],
)
def test_reset_durations_read_like_openai(ms: int, text: str) -> None:
    assert windows.duration(ms) == text
