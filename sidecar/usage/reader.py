from __future__ import annotations

import time
from typing import Literal

import msgspec

from sidecar.identity.model import rfc3339
from sidecar.store.connect import RedisClient
from sidecar.store.keys import Keys
from sidecar.usage import buckets

Granularity = Literal["day", "hour"]


class Point(msgspec.Struct, kw_only=True):
    start: str
    requests: int
    errors: int
    input_tokens: int
    cached_input_tokens: int
    cache_write_tokens: int
    output_tokens: int
    reasoning_tokens: int
    total_tokens: int
    cost: float  # dollars
    cost_nanos: int
    rate_limited_requests: int
    unpriced_requests: int


class Series(msgspec.Struct, kw_only=True):
    granularity: Granularity
    points: list[Point]
    by_source: dict[str, int]  # requests over the last 30 days
    last_source: str | None
    last_seen: str | None


_POINT = (
    buckets.REQUESTS,
    buckets.ERRORS,
    buckets.INPUT,
    buckets.CACHED_INPUT,
    buckets.CACHE_WRITE,
    buckets.OUTPUT,
    buckets.REASONING,
    buckets.COST,
    buckets.RATE_LIMITED,
    buckets.UNPRICED,
)


def _point(start_s: int, values: list[bytes | None]) -> Point:
    r, e, i, ci, cw, o, rs, c, rl, up = (int(v) if v else 0 for v in values)
    return Point(
        start=rfc3339(start_s * 1000),
        requests=r,
        errors=e,
        input_tokens=i,
        cached_input_tokens=ci,
        cache_write_tokens=cw,
        output_tokens=o,
        reasoning_tokens=rs,
        total_tokens=i + o,
        cost=c / 1e9,
        cost_nanos=c,
        rate_limited_requests=rl,
        unpriced_requests=up,
    )


async def series(
    client: RedisClient,
    keys: Keys,
    identity_id: str,
    granularity: Granularity,
    now: float | None = None,
) -> Series:
    """An identity's usage per day (the 30-day window) or per hour (the retained hours),
    oldest first. Call after the 30-day sums were aligned (a metrics read does that)."""
    now = time.time() if now is None else now
    days_key = keys.usage_days(identity_id)
    sources = [f"s:{counter}" for counter in buckets.BY_SOURCE.values()]
    pipe = client.pipeline(transaction=False)
    pipe.hmget(days_key, [*sources, "s:src", "s:at"])
    if granularity == "day":
        first, last = buckets.window(now)
        numbers = list(range(first, last + 1))
        pipe.hmget(days_key, [f"{d}:{c}" for d in numbers for c in _POINT])
        span = buckets.DAY
    else:
        last = buckets.hour(now)
        numbers = list(range(last - buckets.HOUR_RETENTION + 1, last + 1))
        for h in numbers:
            pipe.hmget(keys.usage_hours(identity_id) + str(h), list(_POINT))
        span = buckets.HOUR
    replies = await pipe.execute()
    *counts, last_source, last_at = replies[0]
    if granularity == "day":
        flat = replies[1]
        width = len(_POINT)
        rows = [flat[n * width : (n + 1) * width] for n in range(len(numbers))]
    else:
        rows = replies[1:]
    return Series(
        granularity=granularity,
        points=[_point(number * span, row) for number, row in zip(numbers, rows, strict=True)],
        by_source={
            source.value: int(count or 0)
            for source, count in zip(buckets.BY_SOURCE, counts, strict=True)
        },
        last_source=last_source.decode() if last_source else None,
        last_seen=rfc3339(int(last_at)) if last_at else None,
    )
