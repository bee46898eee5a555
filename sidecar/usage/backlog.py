"""Usage that Redis did not take: kept (in the spool, or in memory without one) and replayed
in order when it answers again; and the spool files that dead processes left."""

from __future__ import annotations

import asyncio
import logging
import time

from sidecar.usage.spool import Entry, Spool, SpoolFull, read
from sidecar.usage.writer import UsageWriter

log = logging.getLogger("sidecar.usage")

MAX_BATCH = 512  # script calls per pipeline
MAX_RETRY = 100_000  # entries held in memory without a spool (beyond: dropped, counted)
ORPHAN_SCAN_S = 5.0  # how often a healthy process looks for spool files of dead ones


class Backlog:
    def __init__(self, writer: UsageWriter, spool: Spool | None) -> None:
        self.writer = writer
        self.spool = spool
        self._retry: list[Entry] = []  # failed writes, in order, when there is no spool
        self._orphans_at = 0.0
        self.dropped = 0  # entries given up (memory or spool full): logged at error

    @property
    def waiting(self) -> int:
        """Entries in memory (the spool's are in `spool.bytes`)."""
        return len(self._retry)

    @property
    def pending(self) -> bool:
        """Entries wait to be replayed: later ones must queue behind them."""
        return bool(self._retry) or (self.spool is not None and self.spool.pending)

    def left_by_others(self) -> bool:
        """Spool files of earlier processes wait (replayed once the store answers)."""
        return self.spool is not None and self.spool.total_bytes() > 0

    async def keep(self, entries: list[Entry]) -> None:
        """Into the spool (fsync'd), or the in-memory retry list without one."""
        if not entries:
            return
        if self.spool is None:
            room = MAX_RETRY - len(self._retry)
            if room < len(entries):
                self.drop(entries[room:], "the retry list is full")
            self._retry += entries[:room]
            return
        try:
            await asyncio.to_thread(self.spool.append, entries)
        except (SpoolFull, OSError) as exc:
            self.drop(entries, str(exc))

    def drop(self, entries: list[Entry], why: str) -> None:
        self.dropped += len(entries)
        log.error("usage of %d identity-hour-models not recorded: %s", len(entries), why)

    async def write_all(self, entries: list[Entry]) -> list[int]:
        results: list[int] = []
        for start in range(0, len(entries), MAX_BATCH):
            results += await self.writer.write(entries[start : start + MAX_BATCH])
        return results

    async def replay_own(self) -> list[tuple[Entry, int]]:
        """Write what this process kept, oldest first; each entry with its result. Raises
        StoreUnavailable, leaving the rest kept."""
        out: list[tuple[Entry, int]] = []
        while self._retry:
            batch = self._retry[:MAX_BATCH]
            out += zip(batch, await self.writer.write(batch), strict=True)
            del self._retry[:MAX_BATCH]
        if self.spool is None:
            return out
        path = self.spool.oldest() or self.spool.rotate()
        if path is None:
            return out
        entries = await asyncio.to_thread(read, path)
        out += zip(entries, await self.write_all(entries), strict=True)
        self.spool.done(path)
        self.spool.replayed += len(entries)
        log.info("replayed %d usage entries from %s", len(entries), path.name)
        return out

    def orphans_due(self) -> bool:
        return self.spool is not None and time.monotonic() >= self._orphans_at

    async def replay_orphans(self) -> list[tuple[Entry, int]]:
        """Write the spool files of processes that are gone (each file whole, then deleted:
        a second write of any of its entries is a no-op)."""
        assert self.spool is not None
        self._orphans_at = time.monotonic() + ORPHAN_SCAN_S
        out: list[tuple[Entry, int]] = []
        for path, fd in self.spool.orphans():
            try:
                entries = await asyncio.to_thread(read, path)
                out += zip(entries, await self.write_all(entries), strict=True)
            except BaseException:
                self.spool.release(fd)
                raise
            self.spool.drop(path, fd)
            self.spool.replayed += len(entries)
            log.info("replayed %d usage entries left in %s", len(entries), path.name)
        if self.spool.total_bytes() == 0:
            self._orphans_at = float("inf")  # none left; new ones only come from crashes
        return out

    def close(self) -> None:
        if self._retry:
            self.drop(self._retry, "shutting down with Redis unreachable and no spool")
            self._retry = []
        if self.spool is not None:
            if self.spool.pending:
                log.warning("%d bytes of usage wait in the spool for a restart", self.spool.bytes)
            self.spool.close()
