from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgspec
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sidecar.store.connect import RedisClient
from sidecar.store.keys import Keys
from sidecar.store.scripts import Script
from sidecar.usage import buckets

log = logging.getLogger("sidecar.usage")

Clock = Callable[[], float]

IDEMPOTENCY_TTL = 7 * 86_400  # a usage report retried within a week is counted once
FLUSH_INTERVAL = 0.01  # inline usage waits at most this long to share a round trip (s)
MAX_BATCH = 512  # script calls per pipeline
MAX_PENDING = 100_000  # identity-hours held while Redis does not answer


class Recorded(msgspec.Struct, frozen=True):
    counted: bool
    duplicate: bool = False


# Called with the pending entry's identity_id, counters, source and time when the identity no
# longer exists (its charges went with it).
OnMissing = Callable[[str, dict[str, int], str, float], Awaitable[None]]


Charges = Mapping[str, tuple[int, int]]  # rate-limit bucket key -> (amount, lifetime s)


class _Pending:
    __slots__ = ("at", "charges", "counters", "on_missing", "source")

    def __init__(self, source: str, at: float, on_missing: OnMissing | None) -> None:
        self.counters: dict[str, int] = {}
        self.charges: dict[str, tuple[int, int]] = {}
        self.source = source
        self.at = at
        self.on_missing = on_missing


class Recorder:
    """Writes usage counters with one script call per identity and hour.

    `record` writes at once (the hooks, idempotent by request id). `add` is for the inline
    proxy: requests of the same identity and hour are summed in memory and written together
    within FLUSH_INTERVAL, one pipeline for all, so that a busy sidecar spends a fraction of a
    round trip per request."""

    def __init__(self, client: RedisClient, keys: Keys, clock: Clock = time.time) -> None:
        self.client = client
        self.keys = keys
        self.clock = clock
        self._record = Script("sidecar.usage.lua", "record", prelude=buckets.COUNTERS_LUA)
        self._pending: dict[tuple[str, int], _Pending] = {}
        self._flusher: asyncio.Task[None] | None = None
        self.dropped = 0  # identity-hours given up because too many were waiting

    async def load_scripts(self) -> None:
        await self._record.load(self.client)

    def _call(
        self,
        identity_id: str,
        counters: Mapping[str, int],
        source: str,
        at: float,
        request_id: str | None,
        charges: Charges,
    ) -> tuple[list[str], list[Any]]:
        now = self.clock()
        hour = buckets.hour(at)
        keys = [
            self.keys.identity(identity_id),
            self.keys.usage_days(identity_id),
            self.keys.usage_hours(identity_id) + str(hour),
        ]
        if request_id is not None:
            keys.append(self.keys.request(identity_id, request_id))
        keys += charges.keys()
        args: list[Any] = [
            buckets.day(at),
            hour,
            # Relative to this process's clock, so that buckets expire by the time they count.
            int((hour + buckets.HOUR_RETENTION + 1) * buckets.HOUR - now),
            IDEMPOTENCY_TTL,
            source,
            int(now * 1000),
            " ".join(f"{counter} {n}" for counter, n in counters.items()),
            " ".join(f"{amount} {lifetime}" for amount, lifetime in charges.values()),
        ]
        return keys, args

    async def record(
        self,
        identity_id: str,
        counters: Mapping[str, int],
        *,
        source: str = "",
        at: float | None = None,
        request_id: str | None = None,
        charges: Charges | None = None,
    ) -> Recorded:
        """Add `counters` to the identity's buckets for the time `at` (default now), now.

        With a request id, a second report of the same id is not counted again."""
        at = self.clock() if at is None else at
        keys, args = self._call(identity_id, counters, source, at, request_id, charges or {})
        result = await self._record(self.client, keys, args)
        return Recorded(counted=result == 1, duplicate=result == 2)

    def add(
        self,
        identity_id: str,
        counters: Mapping[str, int],
        *,
        source: str,
        at: float | None = None,
        on_missing: OnMissing | None = None,
        charges: Charges | None = None,
    ) -> None:
        """Count a request soon, together with others (see the class)."""
        at = self.clock() if at is None else at
        key = (identity_id, buckets.hour(at))
        entry = self._pending.get(key)
        if entry is None:
            if len(self._pending) >= MAX_PENDING:
                self.dropped += 1
                log.error(
                    "usage of %s not recorded: %d identity-hours already wait for Redis",
                    identity_id,
                    len(self._pending),
                )
                return
            entry = self._pending[key] = _Pending(source, at, on_missing)
        entry.source, entry.at = source, max(entry.at, at)
        for counter, n in counters.items():
            entry.counters[counter] = entry.counters.get(counter, 0) + n
        for bucket, (amount, lifetime) in (charges or {}).items():
            entry.charges[bucket] = (entry.charges.get(bucket, (0, 0))[0] + amount, lifetime)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_soon())

    async def drain(self) -> None:
        """Wait until everything added so far is written (or given up)."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.wait([self._flusher])

    async def _flush_soon(self) -> None:
        delay = FLUSH_INTERVAL
        while self._pending:
            await asyncio.sleep(delay)
            batch = list(self._pending.items())[:MAX_BATCH]
            for key, _ in batch:
                del self._pending[key]
            try:
                results = await self._write(batch)
            except RedisError as exc:
                # Put them back, summed with what came since, and try again later. A timeout
                # leaves it unknown whether Redis applied the batch: retrying then risks a double
                # count, dropping it a loss; the store's timeout is long so that this is rare.
                for key, entry in batch:
                    self._merge_back(key, entry)
                level = logging.ERROR if isinstance(exc, RedisTimeoutError) else logging.WARNING
                log.log(
                    level,
                    "usage write failed (%s); %d identity-hours wait",
                    exc,
                    len(self._pending),
                )
                delay = min(max(delay * 2, 0.05), 2.0)
                continue
            delay = FLUSH_INTERVAL
            for (key, entry), result in zip(batch, results, strict=True):
                if result == 0 and entry.on_missing is not None:
                    await entry.on_missing(key[0], entry.counters, entry.source, entry.at)

    def _merge_back(self, key: tuple[str, int], entry: _Pending) -> None:
        current = self._pending.get(key)
        if current is None:
            self._pending[key] = entry
            return
        for counter, n in entry.counters.items():
            current.counters[counter] = current.counters.get(counter, 0) + n
        for bucket, (amount, lifetime) in entry.charges.items():
            current.charges[bucket] = (current.charges.get(bucket, (0, 0))[0] + amount, lifetime)

    async def _write(self, batch: list[tuple[tuple[str, int], _Pending]]) -> list[Any]:
        calls = [self._call(k[0], e.counters, e.source, e.at, None, e.charges) for k, e in batch]
        if len(calls) == 1:
            keys, args = calls[0]
            return [await self._record(self.client, keys, args)]
        if self._record.sha is None:
            await self._record.load(self.client)
        for attempt in range(2):
            pipe = self.client.pipeline(transaction=False)
            for keys, args in calls:
                self._record.queue(pipe, keys, args)
            try:
                return list(await pipe.execute())
            except NoScriptError:
                if attempt:
                    raise
                await self._record.load(self.client)
        raise AssertionError("unreachable")
