"""Building the search index in the background: at start-up for the identities listed before
it existed, and later for any a version without the index listed (a rolling upgrade). One
builder at a time across every process sharing the store (a lock with a TTL); build.lua
indexes a batch of members per call, so no call holds Redis for long. Searches read the list
(the scan) until the index is ready."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from ulid import ULID

from sidecar.errors import StoreUnavailable
from sidecar.identity.records import index_prelude
from sidecar.store.connect import RedisClient
from sidecar.store.errors import call
from sidecar.store.keys import Keys
from sidecar.store.scripts import Script, pipeline
from sidecar.tasks import stopping

log = logging.getLogger("sidecar.identity")

BATCH = 100  # members indexed per build.lua call, at most: a few ms of Redis time
LOOK = 2_000  # members looked at per call, at most (most have a seq when mending)
LOCK_MS = 30_000  # a builder that stops answering hands over after this long
CHECK_S = 60.0  # how often the index is checked for being missing or left half built
RETRY_S = 5.0  # ... after a failure


class IndexStatus(msgspec.Struct, frozen=True):
    state: str  # "absent", "building", "mending" (a built index walked for what it lacks), "ready"
    identities: int  # listed
    indexed: int
    late: int  # seqs in the late set
    late_ms: int


class IndexBuilder:
    def __init__(
        self,
        client: RedisClient,
        keys: Keys,
        *,
        batch: int = BATCH,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.client = client
        self.keys = keys
        self.batch = batch
        self.sleep = sleep
        self.token = str(ULID())
        self.last: IndexStatus | None = None  # as the keeper last saw it (for /healthz)
        self._build = Script("sidecar.identity.lua", "build", prelude=index_prelude())

    @property
    def scripts(self) -> list[Script]:
        return [self._build]

    async def status(self) -> IndexStatus:
        def queue(pipe: Any) -> None:
            pipe.hmget(self.keys.search_meta, "state", "count", "late", "bound")
            pipe.zcard(self.keys.order)
            pipe.zcard(self.keys.search_late)

        (state, count, late_ms, bound), listed, late = await pipeline(self.client, queue)
        name = "absent" if state is None else state.decode()
        if name == "ready" and bound is not None:
            name = "mending"
        return IndexStatus(name, int(listed), int(count or 0), int(late), int(late_ms or 0))

    async def lock(self) -> bool:
        """Become the builder, unless another process is."""
        lock = self.keys.search_build_lock
        return bool(await call(self.client.set(lock, self.token, nx=True, px=LOCK_MS)))

    async def step(self, mend: bool = False) -> tuple[str, int]:
        """One build.lua call: ("building" | "ready" | "lost", members it indexed). `mend`:
        walk a built index too."""
        keys = [self.keys.order, *self.keys.search_index, self.keys.search_build_lock]
        args = [self.token, self.batch, LOCK_MS, LOOK, "1" if mend else "0"]
        state, done = await self._build(self.client, keys, args)
        return state.decode(), int(done)

    async def build(self, mend: bool = False) -> bool:
        """Index every listed identity the index lacks, unless another process is at it; True
        when this process finished (False: another holds the lock, or took it over)."""
        if not await self.lock():
            return False
        began, total = time.monotonic(), 0
        while True:
            state, done = await self.step(mend)
            total += done
            if state == "ready":
                if total:
                    log.info(
                        "search index: %d identities indexed in %.1f s",
                        total,
                        time.monotonic() - began,
                    )
                return True
            if state == "lost":
                log.warning("search index: the build lock expired; another process goes on")
                return False
            if done and total % (self.batch * 1_000) < done:
                log.info("search index: %d identities indexed so far", total)

    async def keep(self) -> None:
        """Run until cancelled. Builds the index when it is missing (the first identity of an
        empty list starts it without a build) or was left half built; once per start, walks a
        built one for identities a version without the index listed (the last sidecar to
        start in a rolling upgrade thus indexes what the older ones listed)."""
        mended = False
        while True:
            wait = CHECK_S
            try:
                status = self.last = await self.status()
                if status.state == "absent" and not status.identities:
                    mended = True  # nothing was listed before this process started
                elif status.state != "ready" or not mended:
                    if status.state == "absent":
                        log.info(
                            "search index: building it for %d identities; searches read the "
                            "list until it is ready",
                            status.identities,
                        )
                    if await self.build(mend=not mended):
                        if status.state != "ready":
                            # A version without the index may have listed behind the walk's
                            # cursor (its clock a little behind): one more walk finds those.
                            await self.build(mend=True)
                        mended = True
                        self.last = await self.status()
                    else:
                        wait = RETRY_S
            except StoreUnavailable as exc:
                stopping()
                log.warning("search index: %s; trying again", exc)
                wait = RETRY_S
            await self.sleep(wait)
