from __future__ import annotations

import functools
import math
from datetime import UTC, datetime

from sidecar.quota.policy import Dimension, Limit

# A sliding window of W ms is a pair of fixed buckets: the count "now" is the current bucket's
# count plus the previous bucket's, weighted by how much of it the window still covers. A
# calendar window (a UTC day, week from Monday, month or year) is one bucket that starts empty
# at its boundary; "once" is one bucket that never rolls (a one-time credit).

DAY_MS = 86_400_000
ONCE_DAYS = 3653  # a "once" bucket is said to end ten years on: its key lives that long
# The calendar windows by name, with their nominal length in seconds (the longest they run).
CALENDARS = {
    "day": 86_400,
    "week": 7 * 86_400,
    "month": 31 * 86_400,
    "year": 366 * 86_400,
    "once": ONCE_DAYS * 86_400,
}


def bucket(limit: Limit, now_ms: int) -> tuple[str, str | None, int, int]:
    """(current bucket id, previous bucket id or None, ms elapsed in it, ms until it ends)."""
    if limit.calendar is None:
        window = limit.window_s * 1000
        index = now_ms // window
        elapsed = now_ms - index * window
        return str(index), str(index - 1), elapsed, window - elapsed
    name, start_ms, end_ms = calendar(limit.calendar, now_ms)
    return name, None, now_ms - start_ms, end_ms - now_ms


def calendar(name: str, now_ms: int) -> tuple[str, int, int]:
    """The calendar window `name` holding `now_ms`: its bucket name, start and end (ms)."""
    return _calendar(name, now_ms // DAY_MS)


@functools.lru_cache(maxsize=64)
def _calendar(calendar: str, day: int) -> tuple[str, int, int]:
    """The UTC calendar window holding `day` (days since the epoch): its bucket name, start
    and end (ms). Worked out once a day, not per request."""
    start = datetime.fromtimestamp(day * 86_400, UTC)
    if calendar == "day":
        return start.strftime("%Y%m%d"), day * DAY_MS, (day + 1) * DAY_MS
    if calendar == "week":
        monday = day - start.weekday()  # weeks start on Monday, 00:00 UTC
        name = datetime.fromtimestamp(monday * 86_400, UTC).strftime("w%Y%m%d")
        return name, monday * DAY_MS, (monday + 7) * DAY_MS
    if calendar == "once":
        # One bucket for ever: it started at the epoch and ends ten years from today.
        return "0", 0, (day + ONCE_DAYS) * DAY_MS
    if calendar == "year":
        first = start.replace(month=1, day=1)
        after = first.replace(year=first.year + 1)
        return first.strftime("%Y"), int(first.timestamp() * 1000), int(after.timestamp() * 1000)
    if calendar != "month":
        raise ValueError(f"no calendar window {calendar!r}")
    first = start.replace(day=1)
    after = (
        first.replace(year=first.year + 1, month=1)
        if first.month == 12
        else first.replace(month=first.month + 1)
    )
    return first.strftime("%Y%m"), int(first.timestamp() * 1000), int(after.timestamp() * 1000)


def used(limit: Limit, previous: int, current: int, elapsed_ms: int) -> float:
    if limit.calendar is not None:
        return float(current)
    window = limit.window_s * 1000
    return previous * (window - elapsed_ms) / window + current


def need(limit: Limit, reserve: int = 0) -> int:
    # A request needs room for itself; tokens and cost are charged afterwards, so without a
    # reservation an identity is refused only once it is at or over the limit; with one, the
    # reservation must fit.
    return 1 if limit.dimension is Dimension.REQUESTS else reserve


def _strict(limit: Limit, reserve: int) -> bool:
    return limit.dimension is not Dimension.REQUESTS and not reserve


def admits(limit: Limit, previous: int, current: int, elapsed_ms: int, reserve: int = 0) -> bool:
    """Whether the window has room for a request; `reserve`: the tokens or nano-dollars a
    token or cost limit's request reserves (0: none, it only needs to be under the limit)."""
    count = used(limit, previous, current, elapsed_ms)
    if _strict(limit, reserve):
        return count < limit.amount
    return count + need(limit, reserve) <= limit.amount


def wait_ms(
    limit: Limit, previous: int, current: int, elapsed_ms: int, left_ms: int, reserve: int = 0
) -> int:
    """How long until the limit would admit again, counting nothing new meanwhile; never
    more than the window's length (a request that can never fit is told to wait that long)."""
    if admits(limit, previous, current, elapsed_ms, reserve):
        return 0
    if limit.calendar is not None:
        return left_ms
    window = limit.window_s * 1000
    room = limit.amount - need(limit, reserve)
    if room < 0:
        return window
    strict = _strict(limit, reserve)
    if current <= room and not (strict and current >= limit.amount) and previous > 0:
        # The previous bucket's weight falls enough before this bucket ends.
        t = left_ms - window * (room - current) / previous
        return min(window, max(0, math.ceil(t + (1 if strict else 0))))
    # Only once this bucket is the previous one, and its weight has fallen enough.
    share = 1 - room / current if current else 0.0
    return min(window, left_ms + max(0, math.ceil(window * share + (1 if strict else 0))))


def reset_ms(limit: Limit, previous: int, current: int, left_ms: int) -> int:
    """Until the count is back to zero (OpenAI's x-ratelimit-reset-*)."""
    if limit.calendar is not None:
        return left_ms if current else 0
    if current:
        return left_ms + limit.window_s * 1000
    return left_ms if previous else 0


# ".5", ".05", ".123" for 500, 50, 123 ms past a whole second; "" for none.
_MILLIS = ("", *(f".{m:03d}".rstrip("0") for m in range(1, 1000)))


def duration(ms: int) -> str:
    """As OpenAI formats x-ratelimit-reset-*: '20ms', '1s', '6m0s', '1h2m3s', '1.5s'. In
    integers and a table of fractions (on every limited response: formatting a float, or a
    fraction per call, costs twice as much)."""
    if ms < 1000:
        return f"{max(ms, 0)}ms"
    hours, rest = divmod(int(ms), 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, millis = divmod(rest, 1000)
    if hours:
        return f"{hours}h{minutes}m{whole}{_MILLIS[millis]}s"
    if minutes:
        return f"{minutes}m{whole}{_MILLIS[millis]}s"
    return f"{whole}{_MILLIS[millis]}s"
