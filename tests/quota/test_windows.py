from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar import money
from sidecar.quota import windows
from sidecar.quota.policy import Dimension, Limit, parse_limit


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


@settings(max_examples=500, deadline=None)
@given(st.integers(min_value=-5, max_value=40 * 86_400_000))
def test_reset_durations_are_those_of_the_seconds_as_a_decimal(ms: int) -> None:
    """In integers, what formatting the seconds to three decimals and trimming gave."""
    if ms < 1000:
        assert windows.duration(ms) == f"{max(ms, 0)}ms"
        return
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    expected = (
        f"{hours}h{minutes}m{seconds}s"
        if hours
        else (f"{minutes}m{seconds}s" if minutes else f"{seconds}s")
    )
    assert windows.duration(ms) == expected


@settings(max_examples=500, deadline=None)
@given(st.integers(min_value=-(10**18), max_value=10**18))
def test_plain_amounts_are_the_shortest_exact_decimals(nanos: int) -> None:
    text = f"{money.to_decimal(nanos):f}"
    expected = text.rstrip("0").rstrip(".") if "." in text else text
    assert money.plain(nanos) == expected
    assert Decimal(money.plain(nanos)) == money.to_decimal(nanos)


# -- calendar windows beyond the day and the month: the week from Monday, the year, and "once"
# (one bucket that never rolls), as runtime budgets count by them.


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


def limit(calendar: str) -> Limit:
    return Limit(Dimension.COST, 10**9, windows.CALENDARS[calendar], calendar, f"1/{calendar}")


@pytest.mark.parametrize(
    ("now", "name", "start", "end"),
    [
        # 2026-12-02 is a Wednesday: its week began on Monday the 30th of November.
        ("2026-12-02T13:00:00", "w20261130", "2026-11-30T00:00:00", "2026-12-07T00:00:00"),
        ("2026-11-30T00:00:00", "w20261130", "2026-11-30T00:00:00", "2026-12-07T00:00:00"),
        ("2026-12-06T23:59:59", "w20261130", "2026-11-30T00:00:00", "2026-12-07T00:00:00"),
        ("2026-12-07T00:00:00", "w20261207", "2026-12-07T00:00:00", "2026-12-14T00:00:00"),
        # A week across the new year keeps the name of its Monday.
        ("2027-01-01T08:00:00", "w20261228", "2026-12-28T00:00:00", "2027-01-04T00:00:00"),
    ],
)
def test_a_week_runs_from_monday_midnight_utc(now: str, name: str, start: str, end: str) -> None:
    current, previous, elapsed, left = windows.bucket(limit("week"), ms(now))
    assert (current, previous) == (name, None)
    assert ms(now) - elapsed == ms(start) and ms(now) + left == ms(end)


@pytest.mark.parametrize(
    ("now", "name", "start", "end"),
    [
        ("2026-07-15T10:00:00", "2026", "2026-01-01T00:00:00", "2027-01-01T00:00:00"),
        ("2026-12-31T23:59:59", "2026", "2026-01-01T00:00:00", "2027-01-01T00:00:00"),
        ("2028-02-29T00:00:00", "2028", "2028-01-01T00:00:00", "2029-01-01T00:00:00"),
    ],
)
def test_a_year_is_the_utc_calendar_year(now: str, name: str, start: str, end: str) -> None:
    current, _, elapsed, left = windows.bucket(limit("year"), ms(now))
    assert current == name
    assert ms(now) - elapsed == ms(start) and ms(now) + left == ms(end)


def test_once_is_one_bucket_that_never_rolls() -> None:
    once = limit("once")
    names = {windows.bucket(once, ms(t))[0] for t in ("2026-01-01T00:00:00", "2031-06-15T12:00:00")}
    assert names == {"0"}
    _, previous, _, left = windows.bucket(once, ms("2026-12-02T13:00:00"))
    assert previous is None
    # Its end is always ten years on, so its key (whose lifetime is what is left) lives that long.
    assert left >= windows.ONCE_DAYS * 86_400_000 - 86_400_000
    # Counting is a calendar window's: what is in the bucket, never weighted, never freeing.
    assert windows.used(once, 0, 10**9, 123) == 10**9
    assert not windows.admits(once, 0, 10**9, 123)
    assert windows.wait_ms(once, 0, 10**9, 123, left) == left


def test_an_unknown_calendar_is_an_error() -> None:
    with pytest.raises(ValueError, match="fortnight"):
        windows.calendar("fortnight", ms("2026-12-02T00:00:00"))


def test_day_and_month_are_unchanged() -> None:
    assert windows.bucket(limit("day"), ms("2026-11-18T12:00:00"))[0] == "20261118"
    name, _, elapsed, left = windows.bucket(limit("month"), ms("2026-11-18T12:00:00"))
    assert name == "202611" and elapsed + left == 30 * 86_400_000
