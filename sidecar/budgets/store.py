"""Budgets in Redis: their records and indexes (the `{budgets}` slot, one script per change),
and their limit buckets (each budget's own slot, keyed by its `_id` as the limiter keys an
identity's): what they hold now, and a reset that empties the current period."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from sidecar.budgets import model
from sidecar.budgets.model import Budget, Used
from sidecar.identity.records import is_ulid
from sidecar.quota import windows
from sidecar.quota.policy import Dimension, Limit
from sidecar.store.connect import RedisClient
from sidecar.store.errors import call
from sidecar.store.keys import Keys
from sidecar.store.scripts import Script, pipeline

Clock = Callable[[], float]

_CHUNK = 500  # records read per MGET
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Budget).decode


class Loaded(msgspec.Struct, frozen=True):
    """Every budget, as of one generation, how often each one's alerts were re-armed, and how
    often each was reset."""

    generation: int
    budgets: list[Budget]
    arms: dict[str, int]
    resets: dict[str, int]


class BudgetStore:
    def __init__(self, client: RedisClient, keys: Keys, clock: Clock = time.time) -> None:
        self.client = client
        self.keys = keys
        self.clock = clock
        self._save = Script("sidecar.budgets.lua", "save")
        self._remove = Script("sidecar.budgets.lua", "remove")
        self._rearm = Script("sidecar.budgets.lua", "rearm")
        self._retarget = Script("sidecar.budgets.lua", "retarget")

    @property
    def scripts(self) -> list[Script]:
        return [self._save, self._remove, self._rearm, self._retarget]

    def _index_keys(self, budget: Budget) -> list[str]:
        keys = self.keys
        return [
            keys.budget(budget.id),
            keys.budgets,
            keys.budget_kind(budget.scope.kind),
            keys.budget_scope(budget.scope.kind, budget.scope.target),
            keys.budget_arms,
            keys.budget_generation,
        ]

    # -- records -------------------------------------------------------------------------------

    async def generation(self) -> int:
        return int(await call(self.client.get(self.keys.budget_generation)) or 0)

    async def get(self, budget_id: str) -> Budget | None:
        if not is_ulid(budget_id):
            return None
        raw = await call(self.client.get(self.keys.budget(budget_id)))
        return _decode(raw) if raw else None

    async def many(self, ids: Sequence[str]) -> list[Budget]:
        """The budgets of `ids` that exist, in order (all in one slot: MGET)."""
        out: list[Budget] = []
        for i in range(0, len(ids), _CHUNK):
            chunk = [self.keys.budget(b) for b in ids[i : i + _CHUNK]]
            out += [_decode(raw) for raw in await call(self.client.mget(chunk)) if raw]
        return out

    async def create(self, budget: Budget) -> None:
        await self._save(
            self.client, self._index_keys(budget), [budget.id, _encode(budget), "create", "0"]
        )

    async def update(self, budget: Budget, rearm: bool) -> bool:
        """False when the budget was deleted meanwhile."""
        args = [budget.id, _encode(budget), "update", "1" if rearm else "0"]
        return bool(await self._save(self.client, self._index_keys(budget), args))

    async def retarget(self, budget: Budget, target: str) -> bool:
        """The budget, scoped to `target` instead (same kind); False when it was deleted."""
        after = msgspec.structs.replace(budget, scope=model.Scope(budget.scope.kind, target))
        keys = self.keys
        return bool(
            await self._retarget(
                self.client,
                [
                    keys.budget(budget.id),
                    keys.budget_scope(budget.scope.kind, budget.scope.target),
                    keys.budget_scope(budget.scope.kind, target),
                    keys.budget_generation,
                ],
                [budget.id, _encode(after)],
            )
        )

    async def delete(self, budget: Budget) -> bool:
        return bool(await self._remove(self.client, self._index_keys(budget), [budget.id]))

    async def load(self) -> Loaded:
        """Every budget. The generation is read first: a change made while this runs bumps it
        again, so the next check loads once more."""
        generation = await self.generation()
        ids = [m.decode() for m in await call(self.client.zrange(self.keys.budgets, 0, -1))]
        budgets = await self.many(ids)
        raw_arms = await call(self.client.hgetall(self.keys.budget_arms))
        arms = {k.decode(): int(v) for k, v in raw_arms.items()}
        raw_resets = await call(self.client.hgetall(self.keys.budget_resets))
        resets = {k.decode(): int(v) for k, v in raw_resets.items()}
        return Loaded(generation, budgets, arms, resets)

    async def arm(self, budget_id: str) -> int:
        return int(await call(self.client.hget(self.keys.budget_arms, budget_id)) or 0)

    async def page(
        self,
        *,
        kind: str | None,
        target: str | None,
        active: bool | None,
        limit: int,
        starting_after: str | None,
        ending_before: str | None,
    ) -> tuple[list[Budget], bool]:
        """One page, newest first, of the budgets that match; and whether there are more."""
        keys = self.keys
        if kind is not None and target is not None:
            index = keys.budget_scope(kind, target)
        elif kind is not None:
            index = keys.budget_kind(kind)
        else:
            index = keys.budgets
        filtered = (target is not None and kind is None) or active is not None
        newest_first = ending_before is None
        cursor = starting_after or ending_before
        bound = f"({cursor}" if cursor else ("+" if newest_first else "-")
        found: list[Budget] = []
        want = limit + 1
        while len(found) < want:
            n = max(want - len(found), _CHUNK if filtered else 0)
            if newest_first:
                members = await call(self.client.zrevrangebylex(index, bound, "-", start=0, num=n))
            else:
                members = await call(self.client.zrangebylex(index, bound, "+", start=0, num=n))
            ids = [m.decode() for m in members]
            for budget in await self.many(ids):
                if target is not None and budget.scope.target != target:
                    continue
                if active is not None and budget.is_active != active:
                    continue
                found.append(budget)
            if len(ids) < n:
                break
            bound = f"({ids[-1]}"
        has_more = len(found) > limit
        found = found[:limit]
        if not newest_first:
            found.reverse()
        return found, has_more

    # -- buckets ---------------------------------------------------------------------------------

    def _bucket(self, budget_id: str, limit: Limit, now_ms: int) -> tuple[str, str | None]:
        """The limit's current bucket key and, for a sliding window, its previous one: the
        keys Limiter.admit counts in for a subject with this `_id`."""
        current, previous, _, _ = windows.bucket(limit, now_ms)
        base = self.keys.limit(budget_id, limit.key_part)
        return base + current, None if previous is None else base + previous

    def bucket_keys(self, budget: Budget, now_ms: int) -> list[str]:
        """Every bucket the budget's limits count in now (both of a sliding window's)."""
        out = []
        for limit in model.as_policy(budget).limits:
            current, previous = self._bucket(budget.id, limit, now_ms)
            out += [current] if previous is None else [current, previous]
        return out

    async def consumption(self, budgets: Sequence[Budget], now_ms: int) -> list[Used]:
        """What each budget's current period holds: cost and tokens (None where it sets no
        such limit). One pipeline."""
        plan: list[tuple[Budget, dict[Dimension, int]]] = []  # reply index per dimension
        keys: list[str] = []
        for budget in budgets:
            slots: dict[Dimension, int] = {}
            for limit in model.as_policy(budget).limits:
                if limit.dimension in (Dimension.COST, Dimension.TOKENS):
                    slots[limit.dimension] = len(keys)
                    keys.append(self._bucket(budget.id, limit, now_ms)[0])
            plan.append((budget, slots))

        def queue(pipe: Any) -> None:
            for key in keys:
                pipe.get(key)

        replies = await pipeline(self.client, queue) if keys else []
        out = []
        for budget, slots in plan:
            name, start_ms, end_ms = model.period(budget, now_ms)
            cost, tokens = slots.get(Dimension.COST), slots.get(Dimension.TOKENS)
            out.append(
                Used(
                    cost_nanos=None if cost is None else int(replies[cost] or 0),
                    tokens=None if tokens is None else int(replies[tokens] or 0),
                    period=name,
                    start_ms=start_ms,
                    end_ms=end_ms,
                )
            )
        return out

    async def reset(self, budget: Budget) -> bool:
        """The current period's consumption back to zero, and the alerts re-armed. The buckets
        go first: a scan in between sees nothing to fire, never the old count re-armed. The
        reservations of requests in flight go with them: each is then charged what it used,
        in full, when it ends (settle.lua), where settling against its reservation would take
        what it reserved off what requests after the reset were counted."""
        now_ms = int(self.clock() * 1000)
        keys = self.bucket_keys(budget, now_ms)
        if keys:
            keys += [self.keys.reservations(budget.id), self.keys.reservations_expiry(budget.id)]
            await call(self.client.delete(*keys))  # one budget's keys: one slot
        args = [budget.id]
        rearm_keys = [
            self.keys.budget(budget.id),
            self.keys.budget_arms,
            self.keys.budget_generation,
            self.keys.budget_resets,
        ]
        return bool(await self._rearm(self.client, rearm_keys, args))
