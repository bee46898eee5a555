"""Counting requests: batched for the inline proxy, at once for the hooks; exactly once."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping

import msgspec

from sidecar import logs
from sidecar.errors import StoreUnavailable
from sidecar.observe.counters import Counters
from sidecar.tasks import Batch, Nap
from sidecar.usage import buckets
from sidecar.usage.backlog import Backlog
from sidecar.usage.spool import Entry, Spool
from sidecar.usage.writer import COUNTED, DUPLICATE, ERASED, Identities, UsageWriter, claim

log = logging.getLogger("sidecar.usage")

Clock = Callable[[], float]
Charges = Mapping[str, tuple[int, int]]  # rate-limit bucket key -> (amount, lifetime s)

# Inline usage waits at most this long to share a round trip (s). Within the 300 ms in which usage
# must show, with room for the write itself; each flush (and Redis running it) falls between the
# upstream exchanges of sequential requests: at 10 ms it added 6% to their p50, at 50 ms 3.5% more
# than at 100 ms (bench.paired_bench, RESULTS.md). What a process killed outright holds in memory,
# this long of usage at most, is lost.
FLUSH_INTERVAL = 0.1
MAX_PENDING = 100_000  # identity-hour-models held in memory (beyond: dropped, counted, logged)
# Inline requests answered within this long are counted together (`later`), at most MAX_LATER.
TALLY_S = 0.01
MAX_LATER = 256


class Recorded(msgspec.Struct, frozen=True):
    counted: bool
    duplicate: bool = False
    spooled: bool = False  # the store failed: kept in the spool, counted when it is back


class Recorder:
    """Writes usage counters, one script call per identity, hour and model, exactly once.

    `record` writes at once (the hooks: idempotent by the caller's request id). `add` is for
    the inline proxy: requests of the same identity, hour and model are summed in memory and
    written together within FLUSH_INTERVAL, one pipeline for all (an identity that used three
    models in the hour is three script calls in that pipeline, in sequence order). Each such
    write carries this process's writer id and a sequence number; the store keeps the highest
    it applied per identity and writer, so writing an entry again (after a timeout that left it
    unknown whether Redis applied it, or from the spool) is a no-op. That holds because one
    identity's entries reach Redis in sequence order: while this process has entries waiting
    in its backlog, new ones queue behind them.

    When Redis fails, entries go to the backlog and are replayed when it is back; a process
    that starts replays the spool files of processes that are gone."""

    def __init__(
        self,
        writer: UsageWriter,
        backlog: Backlog,
        identities: Identities,
        *,
        writer_id: str,
        clock: Clock = time.time,
        counters: Counters | None = None,
    ) -> None:
        self.writer = writer
        self.backlog = backlog
        self.identities = identities
        self.writer_id = writer_id
        self.clock = clock
        self.counters = counters
        self._seq = 0
        # (_id or "" when unknown, external id or "", hour, model) -> what waits
        self._pending: dict[tuple[str, str, int, str], Entry] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._nap = Nap()  # the flusher's wait, which `drain` ends early
        self._closing = False
        self._draining = 0  # drains under way: the flusher writes without waiting its interval
        self._dropped = 0
        self.write_errors = 0
        self._later = Batch(MAX_LATER, TALLY_S, _run_all)  # see `later`

    @property
    def waiting(self) -> int:
        """Entries in memory not yet written, and requests not yet counted (the spool's are
        in its own count)."""
        return len(self._pending) + len(self._later) + self.backlog.waiting

    @property
    def spool(self) -> Spool | None:
        return self.backlog.spool

    @property
    def dropped(self) -> int:
        return self._dropped + self.backlog.dropped

    async def claim(self, request_id: str, external_id: str) -> bool:
        """See writer.claim. Raises StoreUnavailable."""
        writer = self.writer
        return await claim(writer.client, writer.keys, request_id, external_id)

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
        profile: object = None,
        within_s: float | None = None,
        model: str = "",
    ) -> Recorded:
        """Add `counters` to the identity's buckets for the time `at` (default now), now;
        a second report of the same request id is not counted again. When the store fails,
        does not answer within `within_s`, or `identity_id` is None (it could not be found),
        the report goes to the backlog (its request id makes a second write of it a no-op).
        An identity erased after its _id was learnt is looked up again by external id.
        `model` (buckets.model_name): also counted under that model; "" for not."""
        entry = Entry(
            at=self.clock() if at is None else at,
            source=source,
            counters=dict(counters),
            charges=dict(charges or {}),
            identity=identity_id,
            external_id=external_id,
            profile=profile,
            request_id=request_id,
            model=model,
        )
        for _ in range(2):
            if entry.identity is None:
                break
            try:
                async with asyncio.timeout(within_s):
                    (result,) = await self.writer.write([entry])
            except (StoreUnavailable, TimeoutError) as exc:
                log.warning("usage report %s kept for later: %s", request_id, exc)
                break
            if result != ERASED:
                return Recorded(counted=result == COUNTED, duplicate=result == DUPLICATE)
            # Erased after this process learnt its _id: count it under the identity the
            # external id names now (recreated bare unless the body brings a profile).
            if external_id is None:
                return Recorded(counted=False)
            self.identities.forget(external_id)
            try:
                entry.identity = await self.identities.ensure(external_id, profile)
            except StoreUnavailable:
                entry.identity = None
        await self.backlog.keep([entry])
        self._start()
        return Recorded(counted=False, spooled=True)

    def add(
        self,
        identity_id: str | None,
        counters: Mapping[str, int],
        *,
        source: str,
        external_id: str,
        profile: object = None,
        at: float | None = None,
        charges: Charges | None = None,
        model: str = "",
    ) -> None:
        """Count a request soon, together with others (see the class). `identity_id` None:
        the store could not say whose it is; found (or created) when written. `model`
        (buckets.model_name): also counted under that model; "" for not."""
        at = self.clock() if at is None else at
        key = (identity_id or "", "" if identity_id else external_id, buckets.hour(at), model)
        entry = self._pending.get(key)
        if entry is None:
            if len(self._pending) >= MAX_PENDING:
                self._dropped += 1
                log.error(
                    "usage of %s not recorded: %d identity-hour-models already wait for Redis",
                    external_id,
                    len(self._pending),
                )
                return
            entry = self._pending[key] = Entry(
                at=at,
                source=source,
                counters={},
                identity=identity_id,
                external_id=external_id,
                model=model,
            )
        entry.at = max(entry.at, at)
        if source:  # a key owner's VIA counters name no source
            entry.source = source
        if profile is not None:
            entry.profile = profile
        for counter, n in counters.items():
            entry.counters[counter] = entry.counters.get(counter, 0) + n
        for bucket, (amount, lifetime) in (charges or {}).items():
            entry.charges[bucket] = (entry.charges.get(bucket, (0, 0))[0] + amount, lifetime)
        self._start()

    def later(self, count: Callable[[], None]) -> None:
        """Run `count` (what an answered request adds: it calls `add`) together with those of
        the requests answered within TALLY_S, or at once when MAX_LATER wait; whatever waits
        is run first by `drain` and `close`. Run in one go, a request's accounting (its usage
        read, priced, added up) finds its code and data in the CPU's caches where, run after
        each response, it finds them evicted by the HTTP work between: at saturation 6% more
        requests per second (bench.paired_bench, RESULTS.md)."""
        self._later.add(count)

    def tally(self) -> None:
        """Run the counts left for `later` now (what they start in the background, such as
        writing an identity first, the caller waits for)."""
        self._later.send()

    def _start(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._run())

    def start(self) -> None:
        """Replay what earlier processes left in the spool, once the store answers."""
        if self.backlog.left_by_others():
            self._start()

    async def drain(self) -> None:
        """Write what waits now, and wait until everything added so far is written, or kept
        in the backlog, and the top-spenders index has what was written."""
        self.tally()
        # A flusher started but not yet napping would not be woken: it skips its nap instead.
        self._draining += 1
        self._nap.wake()
        rankings = self.writer.rankings
        try:
            while busy := [
                t for t in (self._flusher, rankings.busy) if t is not None and not t.done()
            ]:
                # Again each time: the flusher's writes may have started an index update.
                rankings.hurry()
                await asyncio.wait(busy, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._draining -= 1

    async def close(self, grace_s: float = 5.0) -> None:
        """At shutdown: one more write of what waits, for at most `grace_s` seconds; what
        Redis did not take goes to the spool, where a later process replays it."""
        self.tally()
        self._closing = True
        self._nap.wake()  # the last write now, not at the end of the flush interval
        if self._flusher is not None and not self._flusher.done():
            done, _ = await asyncio.wait([self._flusher], timeout=grace_s)
            if not done:
                self._flusher.cancel()
                await asyncio.wait([self._flusher])
        await self.writer.rankings.drain(timeout_s=1.0)
        await self.backlog.keep(self._take())
        self.backlog.close()
        await self.writer.aclose()

    async def _run(self) -> None:
        logs.clear()  # started by some request, it writes for all of them
        delay = FLUSH_INTERVAL
        backing_off = False
        backlog = self.backlog
        while self._pending or backlog.pending or backlog.orphans_due():
            if not self._closing and (backing_off or not self._draining):
                # A backoff is not cut short by a drain.
                await (asyncio.sleep(delay) if backing_off else self._nap(delay))
            try:
                if backlog.pending:
                    # Behind entries that wait already: in order, or a mark would skip them.
                    await backlog.keep(self._take())
                    await self._recover(await backlog.replay_own())
                else:
                    await self._write_pending()
                if backlog.orphans_due():
                    await self._recover(await backlog.replay_orphans())
            except StoreUnavailable as exc:
                self.write_errors += 1
                log.warning("usage write failed (%s); kept for later", exc)
                if self._closing:
                    return
                delay, backing_off = min(delay * 2, 2.0), True  # 0.2 s, doubling, up to 2 s
                continue
            delay, backing_off = FLUSH_INTERVAL, False

    def _take(self) -> list[Entry]:
        """What waits in memory, each with its sequence number."""
        entries = list(self._pending.values())
        self._pending.clear()
        for entry in entries:
            self._seq += 1
            entry.writer, entry.seq = self.writer_id, self._seq
        return entries

    async def _write_pending(self) -> None:
        entries = self._take()
        if not entries:
            return
        started = time.perf_counter()
        try:
            results = await self.backlog.write_all(entries)
        except BaseException:  # cancelled too: kept, a second write of them is a no-op
            await self.backlog.keep(entries)
            raise
        if self.counters is not None:
            self.counters.usage_write.observe(time.perf_counter() - started)
        await self._recover(zip(entries, results, strict=True))

    async def _recover(self, written: Iterable[tuple[Entry, int]]) -> None:
        """Usage of identities erased after this process learnt their _id: counted again under
        the identity their external id names now (recreated bare unless the body brought a
        profile)."""
        for entry, result in written:
            if result != ERASED or entry.external_id is None:
                continue
            self.identities.forget(entry.external_id)
            if entry.request_id is not None:
                again = msgspec.structs.replace(entry, identity=None, writer="", seq=0)
                await self.backlog.keep([again])
                continue
            self.add(
                None,
                entry.counters,
                source=entry.source,
                external_id=entry.external_id,
                profile=entry.profile,
                at=entry.at,
                charges=entry.charges,
                model=entry.model,
            )


def _run_all(counts: list[Callable[[], None]]) -> None:
    for count in counts:
        try:
            count()
        except Exception:
            log.exception("usage of a request not recorded")
