"""A merged identity's usage, added to its survivor's (identity/merge.py): day counters,
hour buckets, by-model days and the places in the daily top sets.

The two identities live in different slots of a cluster, so the move is three steps, each
safe to run again: read the merged identity's counters (nothing writes them any more: its
record is gone, so record.lua refuses its writes); add them to the survivor's in one script
that first marks the move in the survivor's slot (a second run adds nothing); delete them."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from sidecar.store.connect import RedisClient
from sidecar.store.keys import Keys
from sidecar.store.scripts import Script, pipeline
from sidecar.usage import buckets
from sidecar.usage.counters import UsageCounters, prelude
from sidecar.usage.ranking import Rankings

Clock = Callable[[], float]


class Plan(Protocol):
    """Who is merged into whom (identity.merge.MergePlan)."""

    @property
    def merged_id(self) -> str: ...

    @property
    def into_id(self) -> str: ...


def _pairs(reply: dict[bytes, bytes]) -> list[str]:
    out: list[str] = []
    for field, value in reply.items():
        out += [field.decode(), value.decode()]
    return out


class UsageMover:
    name = "usage"

    def __init__(
        self,
        client: RedisClient,
        keys: Keys,
        counters: UsageCounters,
        rankings: Rankings,
        clock: Clock = time.time,
    ) -> None:
        self.client = client
        self.keys = keys
        self.counters = counters
        self.rankings = rankings
        self.clock = clock
        self._fold = Script(
            "sidecar.usage.lua", "fold", prelude=prelude() + buckets.lua_model_constants()
        )

    @property
    def scripts(self) -> list[Script]:
        return [self._fold]

    async def move(self, plan: Plan) -> None:
        now = self.clock()
        last_hour = buckets.hour(now)
        hours = range(last_hour - buckets.HOUR_RETENTION - 24, last_hour + 2)
        today = buckets.day(now)
        days = range(today - buckets.RETENTION_DAYS - 1, today + 2)
        merged, into = plan.merged_id, plan.into_id

        def read(pipe: Any) -> None:
            pipe.hgetall(self.keys.usage_days(merged))
            for hour in hours:
                pipe.hgetall(self.keys.usage_hours(merged) + str(hour))
            for day in days:
                pipe.hgetall(self.keys.usage_models(merged) + str(day))

        replies = await pipeline(self.client, read)
        day_counters, hour_replies = replies[0], replies[1 : 1 + len(hours)]
        model_replies = replies[1 + len(hours) :]
        keys = [self.keys.merged_into(into), self.keys.usage_days(into)]
        by_hour = []
        for hour, reply in zip(hours, hour_replies, strict=True):
            left = int((hour + buckets.HOUR_RETENTION + 1) * buckets.HOUR - now)
            if reply and left > 0:
                keys.append(self.keys.usage_hours(into) + str(hour))
                by_hour.append([left, _pairs(reply)])
        by_model = []
        for day, reply in zip(days, model_replies, strict=True):
            left = int((day + buckets.RETENTION_DAYS) * buckets.DAY - now)
            if reply and left > 0:
                keys.append(self.keys.usage_models(into) + str(day))
                by_model.append([left, _pairs(reply)])
        payload = {"d": _pairs(day_counters), "h": by_hour, "m": by_model}
        await self._fold(
            self.client, keys, [f"{merged}:usage", today, msgspec.json.encode(payload)]
        )
        await self.counters.erase(merged)
        await self.rankings.move(merged, into)
