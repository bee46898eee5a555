from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import msgspec

from sidecar.store.connect import RedisClient
from sidecar.store.keys import Keys
from sidecar.store.scripts import Script
from sidecar.usage import buckets

Clock = Callable[[], float]

IDEMPOTENCY_TTL = 7 * 86_400  # a usage report retried within a week is counted once


class Recorded(msgspec.Struct, frozen=True):
    counted: bool
    duplicate: bool = False


class Recorder:
    """Writes usage counters; one script call (one round trip) per request."""

    def __init__(self, client: RedisClient, keys: Keys, clock: Clock = time.time) -> None:
        self.client = client
        self.keys = keys
        self.clock = clock
        self._record = Script("sidecar.usage.lua", "record", prelude=buckets.COUNTERS_LUA)

    async def load_scripts(self) -> None:
        await self._record.load(self.client)

    async def record(
        self,
        identity_id: str,
        counters: Mapping[str, int],
        *,
        source: str = "",
        at: float | None = None,
        request_id: str | None = None,
    ) -> Recorded:
        """Add `counters` to the identity's buckets for the time `at` (default now).

        With a request id, a second report of the same id is not counted again."""
        now = self.clock()
        at = now if at is None else at
        hour = buckets.hour(at)
        keys = [
            self.keys.identity(identity_id),
            self.keys.usage_days(identity_id),
            self.keys.usage_hours(identity_id) + str(hour),
        ]
        if request_id is not None:
            keys.append(self.keys.request(identity_id, request_id))
        args: list[str | int] = [
            buckets.day(at),
            hour,
            # Relative to this process's clock, so that buckets expire by the time they count.
            int((hour + buckets.HOUR_RETENTION + 1) * buckets.HOUR - now),
            IDEMPOTENCY_TTL,
            source,
            int(now * 1000),
        ]
        for counter, n in counters.items():
            args += [counter, n]
        result = await self._record(self.client, keys, args)
        return Recorded(counted=result == 1, duplicate=result == 2)
