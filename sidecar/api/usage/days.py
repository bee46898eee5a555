"""UTC days as the usage endpoints take them (YYYY-MM-DD) and the counters number them (days
since the epoch)."""

from __future__ import annotations

import re
from datetime import date, timedelta

from sidecar.errors import InvalidRequest
from sidecar.usage import buckets

EPOCH = date(1970, 1, 1)
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def parse(value: str, param: str) -> int:
    if not _DATE.fullmatch(value):
        raise InvalidRequest(f"{param} must be a date as YYYY-MM-DD, got {value!r}", param=param)
    try:
        return (date.fromisoformat(value) - EPOCH).days
    except ValueError:
        raise InvalidRequest(f"{param}: {value!r} is not a calendar date", param=param) from None


def iso(day: int) -> str:
    return (EPOCH + timedelta(days=day)).isoformat()


def day_range(given_from: str | None, given_to: str | None, now: float) -> tuple[int, int]:
    """First and last day (inclusive, days since the epoch) of a valid range. Default: up to
    today, from 30 days before `to` (the window of the identities' metrics) or the oldest
    day kept, whichever is later."""
    today = buckets.day(now)
    oldest = today - buckets.RETENTION_DAYS + 1
    last = today if given_to is None else parse(given_to, "to")
    if given_from is None:
        first = max(oldest, last - buckets.METRICS_DAYS + 1)
    else:
        first = parse(given_from, "from")
    if last > today:
        raise InvalidRequest(f"to: {iso(last)} is after today ({iso(today)}, UTC)", param="to")
    for day, param in ((first, "from"), (last, "to")):
        if day < oldest:
            raise InvalidRequest(
                f"{param}: {iso(day)} is older than the {buckets.RETENTION_DAYS} days of "
                f"usage kept (the oldest day is {iso(oldest)})",
                param=param,
            )
    if first > last:
        raise InvalidRequest(f"from ({iso(first)}) is after to ({iso(last)})", param="from")
    return first, last
