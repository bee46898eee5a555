"""Reading an identity's usage counters (30-day sums, daily and hourly series) and erasing
them; the Redis side of what usage/buckets.py describes."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import msgspec

from sidecar import money
from sidecar.store.connect import RedisClient
from sidecar.store.keys import Keys
from sidecar.store.scripts import Script, lua, pipeline
from sidecar.usage import buckets
from sidecar.usage.by_model import ModelSums, decode, decode_rows

Clock = Callable[[], float]
Granularity = Literal["day", "hour"]


def prelude() -> str:
    """What every script that reads or writes the day counters starts with."""
    return buckets.lua_constants() + lua("sidecar.usage.lua", "counters")


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
    unreported_requests: int  # answered with success, nothing told what they used


class Series(msgspec.Struct, kw_only=True):
    granularity: Granularity
    points: list[Point]
    by_source: dict[str, int]  # requests over the last 30 days
    last_source: str | None
    last_seen: str | None


_POINT = buckets.USAGE


def rfc3339(epoch_s: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_s))


def _point(start_s: int, values: list[bytes | None]) -> Point:
    r, e, i, ci, cw, o, rs, c, rl, up, ur = (int(v) if v else 0 for v in values)
    return Point(
        start=rfc3339(start_s),
        requests=r,
        errors=e,
        input_tokens=i,
        cached_input_tokens=ci,
        cache_write_tokens=cw,
        output_tokens=o,
        reasoning_tokens=rs,
        total_tokens=i + o,
        cost=money.dollars(c),
        cost_nanos=c,
        rate_limited_requests=rl,
        unpriced_requests=up,
        unreported_requests=ur,
    )


class UsageCounters:
    def __init__(self, client: RedisClient, keys: Keys, clock: Clock = time.time) -> None:
        self.client = client
        self.keys = keys
        self.clock = clock
        self._sums = Script("sidecar.usage.lua", "sums", prelude=prelude())
        self._erase = Script("sidecar.usage.lua", "erase")
        self._models = Script("sidecar.usage.lua", "models", prelude=buckets.lua_model_constants())

    @property
    def scripts(self) -> list[Script]:
        return [self._sums, self._erase, self._models]

    def queue_sums(self, pipe: Any, identity_id: str) -> None:
        """Add the read of one identity's 30-day sums to a pipeline (see `sums_of`)."""
        self._sums.queue(pipe, [self.keys.usage_days(identity_id)], [buckets.day(self.clock())])

    @staticmethod
    def sums_of(reply: list[bytes]) -> dict[str, int]:
        return {c: int(v) for c, v in zip(buckets.COUNTERS, reply, strict=True)}

    async def sums(self, identity_ids: list[str]) -> list[dict[str, int]]:
        """Counter -> sum over the last 30 days, per identity."""

        def queue(pipe: Any) -> None:
            for identity_id in identity_ids:
                self.queue_sums(pipe, identity_id)

        replies = await pipeline(self.client, queue, [self._sums]) if identity_ids else []
        return [self.sums_of(reply) for reply in replies]

    async def series(self, identity_id: str, granularity: Granularity) -> Series:
        """Usage per day (the 30-day window) or per hour (the retained hours), oldest
        first. Call after the 30-day sums were aligned (a sums read does that)."""
        now = self.clock()
        days_key = self.keys.usage_days(identity_id)
        sources = [f"s:{counter}" for counter in buckets.BY_SOURCE.values()]
        if granularity == "day":
            first, last = buckets.window(now)
            numbers = list(range(first, last + 1))
            span = buckets.DAY
        else:
            last = buckets.hour(now)
            numbers = list(range(last - buckets.HOUR_RETENTION + 1, last + 1))
            span = buckets.HOUR

        def queue(pipe: Any) -> None:
            pipe.hmget(days_key, [*sources, "s:src", "s:at"])
            if granularity == "day":
                pipe.hmget(days_key, [f"{d}:{c}" for d in numbers for c in _POINT])
            else:
                for h in numbers:
                    pipe.hmget(self.keys.usage_hours(identity_id) + str(h), list(_POINT))

        replies = await pipeline(self.client, queue)
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
                source: int(count or 0)
                for source, count in zip(buckets.BY_SOURCE, counts, strict=True)
            },
            last_source=last_source.decode() if last_source else None,
            last_seen=rfc3339(int(last_at) // 1000) if last_at else None,
        )

    async def last_sources(self, identity_ids: list[str]) -> list[str | None]:
        """The source of each identity's last counted request (None: none yet)."""

        def queue(pipe: Any) -> None:
            for identity_id in identity_ids:
                pipe.hget(self.keys.usage_days(identity_id), "s:src")

        replies = await pipeline(self.client, queue) if identity_ids else []
        return [v.decode() if v else None for v in replies]

    async def days(
        self,
        identity_ids: list[str],
        first: int,
        last: int,
        counters: Sequence[str] = buckets.COUNTERS,
    ) -> list[list[int]]:
        """Per identity, the sum of each of `counters` (in their order) over the UTC days
        first..last, both included, from the daily counters."""
        fields = [f"{d}:{c}" for d in range(first, last + 1) for c in counters]
        width = len(counters)

        def queue(pipe: Any) -> None:
            for identity_id in identity_ids:
                pipe.hmget(self.keys.usage_days(identity_id), fields)

        replies = await pipeline(self.client, queue) if identity_ids else []
        out = []
        for values in replies:
            sums = [0] * width
            for i, value in enumerate(values):
                if value:
                    sums[i % width] += int(value)
            out.append(sums)
        return out

    def queue_models(self, pipe: Any, identity_id: str, first: int, last: int) -> None:
        """Add the read of one identity's usage by model over the UTC days first..last to a
        pipeline; its reply decodes with `by_model.decode_rows`."""
        self._models.queue(
            pipe,
            [self.keys.usage_days(identity_id)],
            [self.keys.usage_models(identity_id), first, last],
        )

    async def models(self, identity_ids: list[str], first: int, last: int) -> list[ModelSums]:
        """Per identity, its usage by model summed over the UTC days first..last (both
        included): one script call each, in one pipeline."""

        def queue(pipe: Any) -> None:
            for identity_id in identity_ids:
                self.queue_models(pipe, identity_id, first, last)

        replies = await pipeline(self.client, queue, [self._models]) if identity_ids else []
        return [decode_rows(reply) for reply in replies]

    async def model_days(self, identity_id: str, first: int, last: int) -> list[ModelSums]:
        """One identity's usage by model on each UTC day first..last, oldest first."""
        prefix = self.keys.usage_models(identity_id)

        def queue(pipe: Any) -> None:
            for d in range(first, last + 1):
                pipe.hgetall(prefix + str(d))

        replies = await pipeline(self.client, queue)
        return [decode(reply) for reply in replies]

    async def erase(self, identity_id: str) -> None:
        """The identity's day counters, and every hour bucket and by-model day hash younger
        than their retention (and a margin); older ones expired by themselves."""
        now = self.clock()
        last_hour = buckets.hour(now)
        first_hour = last_hour - buckets.HOUR_RETENTION - 24
        last_day = buckets.day(now)
        first_day = last_day - buckets.RETENTION_DAYS - 1
        await self._erase(
            self.client,
            [self.keys.usage_days(identity_id)],
            [
                self.keys.usage_hours(identity_id),
                first_hour,
                last_hour + 1,
                self.keys.usage_models(identity_id),
                first_day,
                last_day + 1,
            ],
        )
