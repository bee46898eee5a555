"""The top-spenders index: written after the usage writes (at most once a second), read to
order the identity list.

Per UTC day and counter (requests, errors, nano-dollars), a sorted set of _id -> that day's
total (Keys.top); a 30-day ranking is their union, built at most once a minute (Keys.ranking),
so pages of one listing agree. Advisory: it orders the list; the counts shown are each
identity's own counters. It lives in the `{idx}` slot, not the identities', so the usage
script cannot update it: a second call does, after the counters' (see `Rankings.add`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from ulid import ULID

from sidecar.errors import StoreUnavailable
from sidecar.store.connect import RedisClient
from sidecar.store.errors import call
from sidecar.store.hotline import HotLine
from sidecar.store.keys import Keys
from sidecar.store.scripts import Call, Script, batch, pipeline
from sidecar.tasks import Nap
from sidecar.usage import buckets

log = logging.getLogger("sidecar.usage")

Clock = Callable[[], float]

# Counters the index ranks by, and how long a day's set outlives the day.
RANKED = (buckets.REQUESTS, buckets.ERRORS, buckets.COST)
TOP_TTL_S = 31 * buckets.DAY + 3_600
SORTS = ("cost", "requests", "error_rate")
RANKING_TTL_S = 60  # a ranking is built at most once a minute: pages of one listing agree
MAX_WAITING = 100_000  # (counter, day, _id) increments held for the next update
# At most one update a second: an identity's increments add up in memory meanwhile, so a busy
# one costs Redis a ZINCRBY per counter a second instead of one per usage write (every 100 ms):
# a seventh of Redis's time per request, when each request was a different identity's
# (bench/RESULTS.md). Rankings are built from the sets at most once a minute: a second's delay
# shows nowhere.
UPDATE_EVERY_S = 1.0
_RANKED_BY = {"cost": buckets.COST, "requests": buckets.REQUESTS}


class Rankings:
    def __init__(self, client: RedisClient, keys: Keys, clock: Clock = time.time) -> None:
        self.client = client
        self.keys = keys
        self.clock = clock
        self._script = Script("sidecar.usage.lua", "rank")
        self._fold = Script("sidecar.usage.lua", "rank_fold")
        # (counter, day, _id) -> what the index still has to add.
        self._waiting: dict[tuple[str, int, str], int] = {}
        self._task: asyncio.Task[None] | None = None
        self._last = -UPDATE_EVERY_S  # the loop's time of the last update
        self._nap = Nap()  # the wait before the next update
        self._hurried = False  # drained: updates without waiting, until nothing waits
        self.errors = 0  # updates lost (failed, or too many waiting): ordering only
        self.line: HotLine | None = None  # the usage writer's, when it has one

    # -- writing ---------------------------------------------------------------------------

    def add(self, identity_id: str, at: float, counters: dict[str, int]) -> None:
        """Queue what a counted usage entry adds; written off the caller's path."""
        day = buckets.day(at)
        if day <= buckets.day(self.clock()) - buckets.METRICS_DAYS:
            return  # a day no ranking reads
        for counter in RANKED:
            n = counters.get(counter, 0)
            if n > 0:
                key = (counter, day, identity_id)
                if key not in self._waiting and len(self._waiting) >= MAX_WAITING:
                    self.errors += 1
                    continue
                self._waiting[key] = self._waiting.get(key, 0) + n
        if self._waiting and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._update())

    def hurry(self) -> None:
        """What waits is written now, and what comes next too, until nothing waits."""
        self._hurried = True
        self._nap.wake()

    async def drain(self, timeout_s: float | None = None) -> None:
        self.hurry()
        if self._task is not None and not self._task.done():
            done, _ = await asyncio.wait([self._task], timeout=timeout_s)
            if not done:
                self._task.cancel()
                await asyncio.wait([self._task])

    @property
    def busy(self) -> asyncio.Task[None] | None:
        return self._task if self._task is not None and not self._task.done() else None

    async def _update(self) -> None:
        try:
            while self._waiting:
                await self._paced()
                await self._write()
        finally:
            self._hurried = False

    async def _paced(self) -> None:
        """Until UPDATE_EVERY_S after the last update, unless hurried."""
        loop = asyncio.get_running_loop()
        wait = self._last + UPDATE_EVERY_S - loop.time()
        if wait > 0 and not self._hurried:
            await self._nap(wait)
        self._last = loop.time()

    async def _write(self) -> None:
        """ZINCRBY the daily top sets, one script call per day. A failure is logged and
        counted, never retried: a retry could count twice, and the index only orders."""
        waiting, self._waiting = self._waiting, {}
        now = self.clock()
        by_day: dict[int, list[str]] = {}
        for (counter, day, identity_id), n in waiting.items():
            by_day.setdefault(day, []).append(f"{counter} {identity_id} {n}")
        calls: list[Call] = []
        for day, increments in by_day.items():
            keys = [self.keys.top(counter, day) for counter in RANKED]
            # Relative to this process's clock, like the hour buckets' lifetime.
            lifetime = max(1, int((day + 1) * buckets.DAY + TOP_TTL_S - now))
            calls.append((keys, [" ".join(RANKED), lifetime, " ".join(increments)]))
        try:
            # Packed, on the writer's line: through the client's command path these
            # calls were a tenth of a lone request's instructions (bench.instr_bench).
            await batch(self.client, self._script, calls, self.line, raise_on_error=True)
        except StoreUnavailable as exc:
            self.errors += 1
            log.warning(
                "top-spenders index not updated for %d counters (%s); list ordering only",
                len(waiting),
                exc,
            )

    async def remove(self, identity_id: str) -> None:
        """Out of every day's sets (and a day's margin each side) and today's rankings."""
        today = buckets.day(self.clock())
        days = range(today - buckets.METRICS_DAYS - 1, today + 2)

        def queue(pipe: Any) -> None:
            for day in days:
                for counter in RANKED:
                    pipe.zrem(self.keys.top(counter, day), identity_id)
            for sort in SORTS:
                for day in (today - 1, today, today + 1):
                    pipe.zrem(self.keys.ranking(sort, day), identity_id)

        await pipeline(self.client, queue)

    @property
    def scripts(self) -> list[Script]:
        return [self._script, self._fold]

    async def move(self, merged_id: str, survivor_id: str) -> None:
        """A merged identity's daily scores become its survivor's (identity/merge.py)."""
        today = buckets.day(self.clock())
        days = range(today - buckets.METRICS_DAYS - 1, today + 2)
        tops = [self.keys.top(counter, day) for day in days for counter in RANKED]
        rankings = [
            self.keys.ranking(sort, day) for sort in SORTS for day in (today - 1, today, today + 1)
        ]
        await self._fold(self.client, tops + rankings, [merged_id, survivor_id, len(tops)])

    # -- reading ---------------------------------------------------------------------------

    async def ranking(self, sort: str) -> str:
        """The key of today's 30-day ranking for `sort` (_id -> score, zero scores left out),
        built from the daily sets when it is missing or older than RANKING_TTL_S."""
        if sort not in SORTS:
            raise ValueError(f"no ranking {sort!r}")
        now = self.clock()
        key = self.keys.ranking(sort, buckets.day(now))
        if await call(self.client.exists(key)):
            return key
        days = range(buckets.window(now)[0], buckets.day(now) + 1)
        if sort in _RANKED_BY:
            sources = [self.keys.top(_RANKED_BY[sort], day) for day in days]

            def union(pipe: Any) -> None:
                pipe.zunionstore(key, sources)
                pipe.expire(key, RANKING_TTL_S)

            await pipeline(self.client, union)
            return key
        # Errors / requests per identity; those without errors are not in it, so they follow.
        requests = await self.ranking("requests")
        errors = [self.keys.top(buckets.ERRORS, day) for day in days]
        failed = _pairs(await call(self.client.zunion(errors, withscores=True)))
        if not failed:
            return key
        members: list[Any] = [m for m, _ in failed]
        totals = await call(self.client.zmscore(requests, members))
        rates = buckets.error_rates(failed, totals)
        staging = f"{key}:{ULID()}"

        def swap(pipe: Any) -> None:
            pipe.zadd(staging, rates)
            pipe.expire(staging, RANKING_TTL_S)
            pipe.rename(staging, key)  # readers see the old ranking or the new one, whole

        await pipeline(self.client, swap)
        return key

    async def position(self, key: str, identity_id: str) -> int | None:
        """Where the identity stands in a ranking (0: first), None when it is not in it."""
        rank: int | None = await call(self.client.zrevrank(key, identity_id))
        return rank

    async def span(self, key: str, start: int, stop: int) -> list[str]:
        """The ids ranked start..stop (both included), highest first."""
        members: list[bytes] = await call(self.client.zrevrange(key, start, stop))
        return [m.decode() for m in members]

    async def size(self, key: str) -> int:
        size: int = await call(self.client.zcard(key))
        return size

    async def unranked(self, key: str, identity_ids: list[str]) -> list[str]:
        """Those of the ids the ranking leaves out, in order."""
        if not identity_ids:
            return []
        scores = await call(self.client.zmscore(key, identity_ids))
        return [i for i, score in zip(identity_ids, scores, strict=True) if score is None]


def _pairs(reply: Any) -> list[tuple[bytes, float]]:
    """(member, score) pairs from a WITHSCORES reply, flat or paired (RESP2 or RESP3)."""
    if reply and not isinstance(reply[0], list | tuple):
        return [(reply[i], float(reply[i + 1])) for i in range(0, len(reply), 2)]
    return [(member, float(score)) for member, score in reply]
