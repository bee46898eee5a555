"""Writing usage entries to their identities' counters, each exactly once (lua/record.lua)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol

from sidecar import ids
from sidecar.store.connect import RedisClient
from sidecar.store.errors import call
from sidecar.store.hotline import HotLine
from sidecar.store.keys import Keys, xid_digest
from sidecar.store.scripts import Script, batch
from sidecar.usage import buckets
from sidecar.usage.counters import prelude
from sidecar.usage.ranking import Rankings
from sidecar.usage.spool import Entry

Clock = Callable[[], float]

IDEMPOTENCY_TTL = 7 * 86_400  # a usage report retried within a week is counted once
WRITER_MARK_TTL = 7 * 86_400  # a writer's sequence mark outlives its last write this long
RESOLVE_CONCURRENCY = 32  # identities first seen during an outage, written at once

# What record.lua answers for each entry.
COUNTED, ERASED, DUPLICATE = 1, 0, 2


class Identities(Protocol):
    """Finds (or creates) the identity of usage counted while the store could not say whose
    it was, and forgets what this process remembers of an erased one."""

    async def ensure(self, external_id: str, profile: object) -> str: ...

    def forget(self, external_id: str) -> None: ...


def writer_floor(now: float) -> str:
    """The smallest writer id (a ULID) created after now - WRITER_MARK_TTL: marks of writers
    older than that are pruned (ULIDs sort by their creation time). Its time part alone: a
    whole ULID draws random bits from the kernel, on every usage write."""
    return ids.time_part(int(max(0.0, now - WRITER_MARK_TTL) * 1000))


async def claim(client: RedisClient, keys: Keys, request_id: str, external_id: str) -> bool:
    """Whether a usage report of `request_id` may count for `external_id`: the first claims the
    request id for its identity (for IDEMPOTENCY_TTL), and a later one must name the same (a
    retry), so that a request is counted once, under one identity, whatever its reports name.
    Raises StoreUnavailable."""
    key = keys.report_claim(request_id)
    whose = xid_digest(external_id)
    if await call(client.set(key, whose, nx=True, ex=IDEMPOTENCY_TTL)):
        return True
    return bool(await call(client.get(key)) == whose.encode())


class UsageWriter:
    def __init__(
        self,
        client: RedisClient,
        keys: Keys,
        identities: Identities,
        rankings: Rankings,
        clock: Clock = time.time,
    ) -> None:
        self.client = client
        self.keys = keys
        self.identities = identities
        self.rankings = rankings
        self.clock = clock
        # A connection of its own on a single server, for these writes and the index's: not
        # the request path's (the limiter's line), so that a batch of writes never waits in
        # front of a limit check in this process.
        self.line = HotLine.for_client(client)
        rankings.line = self.line
        self._record = Script(
            "sidecar.usage.lua", "record", prelude=prelude() + buckets.lua_model_constants()
        )

    async def aclose(self) -> None:
        """Give the line's connection back to the pool (before the pool closes)."""
        if self.line is not None:
            await self.line.aclose()

    @property
    def script(self) -> Script:
        return self._record

    def _call(self, entry: Entry, now: float, floor: str) -> tuple[list[str], list[Any]]:
        assert entry.identity is not None
        hour = buckets.hour(entry.at)
        day = buckets.day(entry.at)
        identity = entry.identity
        keys = [
            self.keys.identity(identity),
            self.keys.usage_days(identity),
            self.keys.usage_hours(identity) + str(hour),
            self.keys.usage_models(identity) + str(day),
        ]
        if entry.request_id is not None:
            keys.append(self.keys.request(identity, entry.request_id))
        tag = f"{{{identity}}}"
        if any(tag not in key for key in entry.charges):
            # Charges made for the _id the process knew, the identity erased and made again
            # since: its limits' buckets are the old _id's (another cluster slot), dropped.
            entry.charges = {key: c for key, c in entry.charges.items() if tag in key}
        keys += entry.charges.keys()
        args: list[Any] = [
            day,
            hour,
            # Relative to this process's clock, so that buckets expire by the time they count.
            int((hour + buckets.HOUR_RETENTION + 1) * buckets.HOUR - now),
            IDEMPOTENCY_TTL,
            entry.source,
            int(now * 1000),
            " ".join(f"{counter} {n}" for counter, n in entry.counters.items()),
            " ".join(f"{amount} {lifetime}" for amount, lifetime in entry.charges.values()),
            entry.writer,
            entry.seq,
            floor,
            entry.model,
            int((day + buckets.RETENTION_DAYS) * buckets.DAY - now),
        ]
        return keys, args

    async def _resolve(self, entries: list[Entry]) -> None:
        """Find (or create) the identities of entries counted without one."""
        profiles = {e.external_id: e.profile for e in entries if e.identity is None}
        if not profiles:
            return
        found: dict[str, str] = {}
        gate = asyncio.Semaphore(RESOLVE_CONCURRENCY)

        async def one(external_id: str, profile: object) -> None:
            async with gate:
                found[external_id] = await self.identities.ensure(external_id, profile)

        await asyncio.gather(*(one(x, p) for x, p in profiles.items() if x is not None))
        for entry in entries:
            if entry.identity is None and entry.external_id is not None:
                entry.identity = found[entry.external_id]

    async def write(self, entries: list[Entry]) -> list[int]:
        """Each entry's result (COUNTED, ERASED or DUPLICATE). Raises StoreUnavailable with
        nothing known about what was applied: writing the same entries again is safe."""
        await self._resolve(entries)
        now = self.clock()
        floor = writer_floor(now)
        calls = [self._call(e, now, floor) for e in entries]
        # A call that failed fails the write; the others applied: written again, no-ops.
        replies = await batch(self.client, self._record, calls, self.line, raise_on_error=True)
        results = [int(r) for r in replies]
        # The counters are written: nothing below may raise, or they would be written again.
        for entry, result in zip(entries, results, strict=True):
            if result == COUNTED and entry.identity is not None:
                self.rankings.add(entry.identity, entry.at, entry.counters)
        return results
