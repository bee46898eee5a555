from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgspec
from redis.exceptions import NoScriptError
from ulid import ULID

from sidecar import logs
from sidecar.identity.model import Profile
from sidecar.metrics import Metrics
from sidecar.store.connect import RedisClient
from sidecar.store.errors import STORE_ERRORS, STORE_OR_TIMEOUT
from sidecar.store.keys import Keys
from sidecar.store.scripts import Script
from sidecar.usage import buckets
from sidecar.usage.spool import Entry, Spool, SpoolFull, read

log = logging.getLogger("sidecar.usage")

Clock = Callable[[], float]

IDEMPOTENCY_TTL = 7 * 86_400  # a usage report retried within a week is counted once
WRITER_MARK_TTL = 7 * 86_400  # a writer's sequence mark outlives its last write this long
FLUSH_INTERVAL = 0.01  # inline usage waits at most this long to share a round trip (s)
MAX_BATCH = 512  # script calls per pipeline
MAX_PENDING = 100_000  # identity-hours held in memory (beyond: dropped, counted, logged)
RESOLVE_CONCURRENCY = 32  # identities first seen during an outage, written at once
ORPHAN_SCAN_S = 5.0  # how often a healthy process looks for spool files of dead ones
# Counters the top-spenders index ranks by (Keys.top), and how long a day's set outlives the day.
RANKED = (buckets.REQUESTS, buckets.ERRORS, buckets.COST)
TOP_TTL_S = 31 * buckets.DAY + 3_600

# The identity's _id for an external id (and the profile a body identity brought): called for
# usage counted while the store could not say which identity it belonged to.
Resolver = Callable[[str, Profile | None], Awaitable[str]]
Forget = Callable[[str], None]
Charges = Mapping[str, tuple[int, int]]  # rate-limit bucket key -> (amount, lifetime s)

_COUNTED, _ERASED, _DUPLICATE = 1, 0, 2


class Recorded(msgspec.Struct, frozen=True):
    counted: bool
    duplicate: bool = False
    spooled: bool = False  # the store failed: kept in the spool, counted when it is back


def writer_floor(now: float) -> str:
    """The smallest writer id (a ULID) created after now - WRITER_MARK_TTL: marks of writers
    older than that are pruned (ULIDs sort by their creation time)."""
    return str(ULID.from_timestamp(max(0.0, now - WRITER_MARK_TTL)))[:10]


class Recorder:
    """Writes usage counters, one script call per identity and hour, exactly once.

    `record` writes at once (the hooks: idempotent by the caller's request id). `add` is for
    the inline proxy: requests of the same identity and hour are summed in memory and written
    together within FLUSH_INTERVAL, one pipeline for all. Each such write carries this
    process's writer id and a sequence number; the store keeps the highest it applied per
    identity and writer, so writing an entry again (after a timeout that left it unknown
    whether Redis applied it, or from the spool) is a no-op. That holds because one identity's
    entries reach Redis in sequence order: while this process has entries in the spool, new
    ones go to the spool behind them.

    When Redis fails, entries go to the spool (fsync'd) and are replayed when it is back; a
    process that starts replays the spool files of processes that are gone."""

    def __init__(
        self,
        client: RedisClient,
        keys: Keys,
        clock: Clock = time.time,
        *,
        spool: Spool | None = None,
        writer: str | None = None,
    ) -> None:
        """`writer`: this process's id (a new ULID by default; the spool's when given)."""
        self.client = client
        self.keys = keys
        self.clock = clock
        self.spool = spool
        self.writer = spool.writer if spool is not None else writer or str(ULID())
        self.resolver: Resolver | None = None
        self.forget: Forget | None = None
        self._record = Script("sidecar.usage.lua", "record", prelude=buckets.COUNTERS_LUA)
        self._rank_script = Script("sidecar.usage.lua", "rank")
        self._seq = 0
        # (_id or "" when unknown, external id or "", hour) -> what waits
        self._pending: dict[tuple[str, str, int], Entry] = {}
        self._retry: list[Entry] = []  # failed writes, in order, when there is no spool
        self._flusher: asyncio.Task[None] | None = None
        self._orphans_at = 0.0
        self._closing = False
        self.dropped = 0  # entries given up (memory or spool full): logged at error
        self.write_errors = 0
        self.metrics: Metrics | None = None
        # (counter, day, _id) -> what the top-spenders index still has to add.
        self._ranks: dict[tuple[str, int, str], int] = {}
        self._ranker: asyncio.Task[None] | None = None
        self.index_errors = 0  # index updates lost (failed, or too many waiting): ordering only

    async def load_scripts(self) -> None:
        await self._record.load(self.client)

    @property
    def waiting(self) -> int:
        """Entries in memory not yet written (the spool's are in `spool.bytes`)."""
        return len(self._pending) + len(self._retry)

    def _call(self, entry: Entry, now: float, floor: str) -> tuple[list[str], list[Any]]:
        assert entry.identity is not None
        hour = buckets.hour(entry.at)
        identity = entry.identity
        keys = [
            self.keys.identity(identity),
            self.keys.usage_days(identity),
            self.keys.usage_hours(identity) + str(hour),
        ]
        if entry.request_id is not None:
            keys.append(self.keys.request(identity, entry.request_id))
        keys += entry.charges.keys()
        args: list[Any] = [
            buckets.day(entry.at),
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
        ]
        return keys, args

    async def record(
        self,
        identity_id: str | None,
        counters: Mapping[str, int],
        *,
        source: str = "",
        at: float | None = None,
        request_id: str,
        charges: Charges | None = None,
        external_id: str | None = None,
        profile: Profile | None = None,
        within_s: float | None = None,
    ) -> Recorded:
        """Add `counters` to the identity's buckets for the time `at` (default now), now;
        a second report of the same request id is not counted again. When the store fails,
        does not answer within `within_s`, or `identity_id` is None (it could not be found),
        the report goes to the spool (its request id makes a second write of it a no-op)."""
        entry = Entry(
            at=self.clock() if at is None else at,
            source=source,
            counters=dict(counters),
            charges=dict(charges or {}),
            identity=identity_id,
            external_id=external_id,
            profile=profile,
            request_id=request_id,
        )
        if identity_id is not None:
            try:
                async with asyncio.timeout(within_s):
                    (result,) = await self._write([entry], recover=False)
            except STORE_OR_TIMEOUT as exc:
                log.warning("usage report %s kept for later: %s", request_id, exc)
            else:
                return Recorded(counted=result == _COUNTED, duplicate=result == _DUPLICATE)
        await self._keep([entry])
        self._start()
        return Recorded(counted=False, spooled=True)

    def add(
        self,
        identity_id: str | None,
        counters: Mapping[str, int],
        *,
        source: str,
        external_id: str,
        profile: Profile | None = None,
        at: float | None = None,
        charges: Charges | None = None,
    ) -> None:
        """Count a request soon, together with others (see the class). `identity_id` None:
        the store could not say whose it is; found (or created) when written."""
        at = self.clock() if at is None else at
        key = (identity_id or "", "" if identity_id else external_id, buckets.hour(at))
        entry = self._pending.get(key)
        if entry is None:
            if len(self._pending) >= MAX_PENDING:
                self.dropped += 1
                log.error(
                    "usage of %s not recorded: %d identity-hours already wait for Redis",
                    external_id,
                    len(self._pending),
                )
                return
            entry = self._pending[key] = Entry(
                at=at, source=source, counters={}, identity=identity_id, external_id=external_id
            )
        entry.source, entry.at = source, max(entry.at, at)
        if profile is not None:
            entry.profile = profile
        for counter, n in counters.items():
            entry.counters[counter] = entry.counters.get(counter, 0) + n
        for bucket, (amount, lifetime) in (charges or {}).items():
            entry.charges[bucket] = (entry.charges.get(bucket, (0, 0))[0] + amount, lifetime)
        self._start()

    def _start(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._run())

    def start(self) -> None:
        """Look for spool files left by earlier processes (and replay them when the store
        answers); nothing to do without a spool."""
        if self.spool is not None and self.spool.total_bytes() > 0:
            self._start()

    async def drain(self) -> None:
        """Wait until everything added so far is written, or kept in the spool, and the
        top-spenders index has what was written."""
        while busy := [t for t in (self._flusher, self._ranker) if t is not None and not t.done()]:
            await asyncio.wait(busy)

    async def close(self, grace_s: float = 5.0) -> None:
        """At shutdown: one more write of what waits, for at most `grace_s` seconds; what
        Redis did not take goes to the spool, where a later process replays it."""
        self._closing = True
        if self._flusher is not None and not self._flusher.done():
            done, _ = await asyncio.wait([self._flusher], timeout=grace_s)
            if not done:
                self._flusher.cancel()
                await asyncio.wait([self._flusher])
        if self._ranker is not None and not self._ranker.done():
            done, _ = await asyncio.wait([self._ranker], timeout=1.0)
            if not done:
                self._ranker.cancel()
                await asyncio.wait([self._ranker])
        await self._keep(self._take())
        if self._retry:
            self._drop(self._retry, "shutting down with Redis unreachable and no spool")
            self._retry = []
        if self.spool is not None:
            if self.spool.pending:
                log.warning("%d bytes of usage wait in the spool for a restart", self.spool.bytes)
            self.spool.close()

    def _backlog(self) -> bool:
        return bool(self._retry) or (self.spool is not None and self.spool.pending)

    async def _run(self) -> None:
        logs.clear()  # started by some request, it writes for all of them
        delay = FLUSH_INTERVAL
        while self._pending or self._backlog() or self._orphans_due():
            if not self._closing:
                await asyncio.sleep(delay)
            try:
                if self._backlog():
                    # Behind entries that wait already: in order, or a mark would skip them.
                    await self._keep(self._take())
                    await self._replay_own()
                else:
                    started, batch = time.perf_counter(), bool(self._pending)
                    await self._write_batch()
                    if batch and self.metrics is not None:
                        self.metrics.usage_write.observe(time.perf_counter() - started)
                if self._orphans_due():
                    await self._replay_orphans()
            except STORE_ERRORS as exc:
                self.write_errors += 1
                log.warning("usage write failed (%s); kept for later", exc)
                if self._closing:
                    return
                delay = min(max(delay * 2, 0.05), 2.0)
                continue
            delay = FLUSH_INTERVAL

    def _take(self) -> list[Entry]:
        """What waits in memory, each with its sequence number."""
        entries = list(self._pending.values())
        self._pending.clear()
        for entry in entries:
            self._seq += 1
            entry.writer, entry.seq = self.writer, self._seq
        return entries

    async def _write_batch(self) -> None:
        entries = self._take()
        for start in range(0, len(entries), MAX_BATCH):
            chunk = entries[start : start + MAX_BATCH]
            try:
                await self._write(chunk)
            except BaseException:  # cancelled too: kept, a second write of them is a no-op
                await self._keep(entries[start:])
                raise

    async def _keep(self, entries: list[Entry]) -> None:
        """Out of memory into the spool, or into the in-memory retry list without one."""
        if not entries:
            return
        if self.spool is None:
            room = MAX_PENDING - len(self._retry)
            if room < len(entries):
                self._drop(entries[room:], "the retry list is full")
            self._retry += entries[:room]
            return
        try:
            await asyncio.to_thread(self.spool.append, entries)
        except (SpoolFull, OSError) as exc:
            self._drop(entries, str(exc))

    def _drop(self, entries: list[Entry], why: str) -> None:
        self.dropped += len(entries)
        log.error("usage of %d identity-hours not recorded: %s", len(entries), why)

    async def _replay_own(self) -> None:
        while self._retry:
            await self._write(self._retry[:MAX_BATCH])
            del self._retry[:MAX_BATCH]
        if self.spool is None:
            return
        path = self.spool.oldest() or self.spool.rotate()
        if path is None:
            return
        entries = await asyncio.to_thread(read, path)
        for start in range(0, len(entries), MAX_BATCH):
            await self._write(entries[start : start + MAX_BATCH])
        self.spool.done(path)
        self.spool.replayed += len(entries)
        log.info("replayed %d usage entries from %s", len(entries), path.name)

    def _orphans_due(self) -> bool:
        return self.spool is not None and time.monotonic() >= self._orphans_at

    async def _replay_orphans(self) -> None:
        assert self.spool is not None
        self._orphans_at = time.monotonic() + ORPHAN_SCAN_S
        for path, fd in self.spool.orphans():
            try:
                entries = await asyncio.to_thread(read, path)
                for start in range(0, len(entries), MAX_BATCH):
                    await self._write(entries[start : start + MAX_BATCH])
            except BaseException:
                self.spool.release(fd)
                raise
            self.spool.drop(path, fd)
            self.spool.replayed += len(entries)
            log.info("replayed %d usage entries left in %s", len(entries), path.name)
        if self.spool.total_bytes() == 0:
            self._orphans_at = float("inf")  # none left; new ones only come from crashes

    async def _resolve(self, entries: list[Entry]) -> None:
        """Find (or create) the identities of entries counted without one."""
        profiles = {e.external_id: e.profile for e in entries if e.identity is None}
        if not profiles:
            return
        if self.resolver is None:
            raise RuntimeError("usage without an identity, and no resolver")
        resolver = self.resolver
        found: dict[str, str] = {}
        gate = asyncio.Semaphore(RESOLVE_CONCURRENCY)

        async def one(external_id: str, profile: Profile | None) -> None:
            async with gate:
                found[external_id] = await resolver(external_id, profile)

        await asyncio.gather(*(one(x, p) for x, p in profiles.items() if x is not None))
        for entry in entries:
            if entry.identity is None and entry.external_id is not None:
                entry.identity = found[entry.external_id]

    async def _write(self, entries: list[Entry], *, recover: bool = True) -> list[int]:
        """Write; raises one of STORE_ERRORS with nothing known about what was applied
        (writing the same entries again is safe). With `recover`, usage of an identity erased
        meanwhile is counted again under the identity its external id names now."""
        await self._resolve(entries)
        now = self.clock()
        floor = writer_floor(now)
        calls = [self._call(e, now, floor) for e in entries]
        if len(calls) == 1:
            results = [int(await self._record(self.client, *calls[0]))]
        else:
            results = await self._pipeline(calls)
        # The counters are written: nothing below may raise, or they would be written again.
        self._rank(entries, results)
        if recover:
            for entry, result in zip(entries, results, strict=True):
                if result == _ERASED:
                    await self._erased(entry)
        return results

    def _rank(self, entries: list[Entry], results: list[int]) -> None:
        """Queue what the counted entries add to the top-spenders index. It lives in the
        `{idx}` slot, not the identity's, so record.lua cannot update it: a second pipeline
        does, after the counters' (see `_update_ranks`)."""
        oldest = buckets.day(self.clock()) - buckets.METRICS_DAYS
        for entry, result in zip(entries, results, strict=True):
            day = buckets.day(entry.at)
            if result != _COUNTED or entry.identity is None or day <= oldest:
                continue  # a duplicate, an erased identity, or a day no ranking reads
            for counter in RANKED:
                n = entry.counters.get(counter, 0)
                if n > 0:
                    key = (counter, day, entry.identity)
                    if key not in self._ranks and len(self._ranks) >= MAX_PENDING:
                        self.index_errors += 1
                        continue
                    self._ranks[key] = self._ranks.get(key, 0) + n
        if self._ranks and (self._ranker is None or self._ranker.done()):
            self._ranker = asyncio.create_task(self._update_ranks())

    async def _update_ranks(self) -> None:
        """ZINCRBY the daily top sets. Off the flush loop, so that a slow index never delays
        usage; a failure is logged and counted, never retried: the index orders the list (the
        counts shown are the identity's own), and a retry could count twice."""
        while self._ranks:
            ranks, self._ranks = self._ranks, {}
            now = self.clock()
            by_day: dict[int, list[str]] = {}
            for (counter, day, identity), n in ranks.items():
                by_day.setdefault(day, []).append(f"{counter} {identity} {n}")
            try:
                for day, increments in by_day.items():
                    keys = [self.keys.top(counter, day) for counter in RANKED]
                    # Relative to this process's clock, like the hour buckets' lifetime.
                    lifetime = max(1, int((day + 1) * buckets.DAY + TOP_TTL_S - now))
                    args = [" ".join(RANKED), lifetime, " ".join(increments)]
                    await self._rank_script(self.client, keys, args)
            except STORE_ERRORS as exc:
                self.index_errors += 1
                log.warning(
                    "top-spenders index not updated for %d counters (%s); list ordering only",
                    len(ranks),
                    exc,
                )

    async def _erased(self, entry: Entry) -> None:
        """The identity was erased after this process learnt its _id: count the request
        under the identity its external id names now (recreated bare unless the body brought
        a profile)."""
        if entry.external_id is None:
            return
        if self.forget is not None:
            self.forget(entry.external_id)
        if entry.request_id is not None:
            await self._keep([msgspec.structs.replace(entry, identity=None, writer="", seq=0)])
            return
        self.add(
            None,
            entry.counters,
            source=entry.source,
            external_id=entry.external_id,
            profile=entry.profile,
            at=entry.at,
            charges=entry.charges,
        )

    async def _pipeline(self, calls: list[tuple[list[str], list[Any]]]) -> list[int]:
        if self._record.sha is None:
            await self._record.load(self.client)
        for attempt in range(2):
            pipe = self.client.pipeline(transaction=False)
            for keys, args in calls:
                self._record.queue(pipe, keys, args)
            try:
                return [int(r) for r in await pipe.execute()]
            except NoScriptError:
                if attempt:
                    raise
                await self._record.load(self.client)
        raise AssertionError("unreachable")
