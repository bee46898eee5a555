"""The budgets in force, as admission reads them on every request (an in-process cache, reloaded
when the store's generation moves: checked once a second), and the budget API's operations."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from ulid import ULID

from sidecar.budgets import model
from sidecar.budgets.model import Budget, BudgetCreate, BudgetPatch, BudgetView, Used
from sidecar.budgets.outbox import Delivery, Outbox
from sidecar.budgets.store import BudgetStore, Loaded
from sidecar.errors import InvalidRequest, NotFound, StoreUnavailable
from sidecar.identity.merge import MergePlan
from sidecar.identity.model import InvalidField
from sidecar.quota.decision import Subject
from sidecar.quota.policy import Policy
from sidecar.tasks import keep_refreshed

log = logging.getLogger("sidecar.budgets")

Clock = Callable[[], float]

REFRESH_S = 1.0  # how often a process checks whether the budgets changed


class Entry(NamedTuple):
    budget: Budget
    policy: Policy
    arm: int  # how often its alerts were re-armed (a reset, a changed amount)


def _invalid(exc: InvalidField) -> InvalidRequest:
    return InvalidRequest(exc.message, param=exc.param)


class Budgets:
    def __init__(self, store: BudgetStore, outbox: Outbox, clock: Clock = time.time) -> None:
        self.store = store
        self.outbox = outbox
        self.clock = clock
        self.generation = -1  # of the budgets loaded; -1: none yet
        self.loads = 0
        self._entries: dict[str, Entry] = {}
        self._by_identity: dict[str, list[Entry]] = {}
        self._by_tag: dict[str, list[Entry]] = {}
        self._by_owner: dict[str, list[Entry]] = {}
        self._tags: frozenset[str] = frozenset()
        self._charging = False  # some budget limits tokens or cost
        # budget _id -> external id of the last request checked against it (alerts name it)
        self._touched: dict[str, str] = {}
        self._lock = asyncio.Lock()
        self._resets: dict[str, int] = {}  # budget _id -> how often it was reset, as loaded
        # Told the buckets of the budgets reset since the last load (the limiter: it ends the
        # quota this process held ahead in them).
        self.on_reset: Callable[[list[str]], None] | None = None

    # -- in force: what admission reads (no I/O) ---------------------------------------------

    @property
    def active(self) -> bool:
        return bool(self._entries)

    @property
    def tags(self) -> frozenset[str]:
        return self._tags

    @property
    def charging(self) -> bool:
        return self._charging

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _applicable(self, external_id: str, tags: Sequence[str], owner: str | None) -> list[Entry]:
        if not self._entries:  # the common case: no budget at all, nothing to look up
            return []
        now_ms = self._now_ms()
        found: dict[str, Entry] = {}
        groups = [self._by_identity.get(external_id, ())]
        groups += [self._by_tag.get(tag, ()) for tag in tags] if self._by_tag else []
        if self._by_owner:
            groups.append(self._by_owner.get(external_id, ()))
            if owner is not None and owner != external_id:
                groups.append(self._by_owner.get(owner, ()))
        for group in groups:
            for entry in group:
                if entry.budget.live(now_ms):
                    found[entry.budget.id] = entry
        return list(found.values())

    def applicable(
        self, external_id: str, tags: Sequence[str], owner: str | None = None
    ) -> list[tuple[Budget, Policy]]:
        """The budgets in force for a request of `external_id` with `tags`, carrying `owner`'s
        key: the identity's, its tags', and the key owner's (or the identity's own, when it is
        a key owner)."""
        return [(e.budget, e.policy) for e in self._applicable(external_id, tags, owner)]

    def subjects(self, external_id: str, tags: Sequence[str], owner: str | None) -> list[Subject]:
        out = []
        for budget, policy, _ in self._applicable(external_id, tags, owner):
            scope = budget.scope
            who = scope.target if scope.kind == "api_key_owner" else external_id
            out.append(Subject(budget.id, who, policy, budget=budget.id))
            if budget.thresholds:
                self._touched[budget.id] = external_id
        return out

    def subject(self, budget_id: str) -> Subject | None:
        entry = self._entries.get(budget_id)
        if entry is None:
            return None
        scope = entry.budget.scope
        return Subject(budget_id, scope.target, entry.policy, budget=budget_id)

    def with_alerts(self) -> list[Entry]:
        """The budgets in force that have alert thresholds over cost or tokens."""
        now_ms = self._now_ms()
        return [
            e
            for e in self._entries.values()
            if e.budget.thresholds
            and e.budget.live(now_ms)
            and (e.budget.amount_nanos is not None or e.budget.token_limit is not None)
        ]

    def take_touched(self) -> dict[str, str]:
        """The last request's identity per budget since the previous call."""
        touched, self._touched = self._touched, {}
        return touched

    # -- keeping the cache ---------------------------------------------------------------------

    async def refresh(self) -> bool:
        """Reload when the store's generation moved; True when it did. Raises StoreUnavailable."""
        async with self._lock:
            if await self.store.generation() == self.generation:
                return False
            self._install(await self.store.load())
            return True

    def _install(self, loaded: Loaded) -> None:
        emptied: list[str] = []  # the buckets of budgets reset since the last load
        if self.generation >= 0:
            now_ms = self._now_ms()
            for budget in loaded.budgets:
                if loaded.resets.get(budget.id, 0) != self._resets.get(budget.id, 0):
                    emptied += self.store.bucket_keys(budget, now_ms)
        self._resets = loaded.resets
        entries: dict[str, Entry] = {}
        by_identity: dict[str, list[Entry]] = {}
        by_tag: dict[str, list[Entry]] = {}
        by_owner: dict[str, list[Entry]] = {}
        index = {"identity": by_identity, "tag": by_tag, "api_key_owner": by_owner}
        for budget in loaded.budgets:
            if not budget.is_active:
                continue
            entry = Entry(budget, model.as_policy(budget), loaded.arms.get(budget.id, 0))
            entries[budget.id] = entry
            index[budget.scope.kind].setdefault(budget.scope.target, []).append(entry)
        self._entries = entries
        self._by_identity, self._by_tag, self._by_owner = by_identity, by_tag, by_owner
        self._tags = frozenset(by_tag)
        self._charging = any(
            e.budget.amount_nanos is not None or e.budget.token_limit is not None
            for e in entries.values()
        )
        self.generation = loaded.generation
        self.loads += 1
        if emptied and self.on_reset is not None:
            self.on_reset(emptied)

    async def watch(self, interval: float = REFRESH_S) -> None:
        """Keep the cache fresh: a GET of the generation per `interval`, a reload when moved."""
        await keep_refreshed(self.refresh, interval, "budgets", log)

    async def _refreshed(self) -> None:
        """After a change made here: in force in this process at once (the others follow
        within REFRESH_S)."""
        try:
            await self.refresh()
        except StoreUnavailable as exc:
            log.warning("budgets not reloaded after a change (%s)", exc)

    # -- the API's operations -------------------------------------------------------------------

    async def found(self, budget_id: str) -> Budget:
        budget = await self.store.get(budget_id)
        if budget is None:
            raise NotFound(f"no budget with _id {budget_id[:64]!r}", param="id")
        return budget

    async def viewed(self, budgets: Sequence[Budget]) -> list[BudgetView]:
        """The budgets with their consumption (one pipeline)."""
        used = await self.store.consumption(budgets, self._now_ms())
        return [model.view(b, u) for b, u in zip(budgets, used, strict=True)]

    async def create(self, data: BudgetCreate) -> BudgetView:
        now = self.clock()
        try:
            budget = model.created(
                data, budget_id=str(ULID.from_timestamp(now)), now_ms=int(now * 1000)
            )
        except InvalidField as exc:
            raise _invalid(exc) from None
        await self.store.create(budget)
        await self._refreshed()
        return model.view(budget, model.unused(budget, budget.created_ms))

    async def get(self, budget_id: str) -> BudgetView:
        return (await self.viewed([await self.found(budget_id)]))[0]

    async def patch(self, budget_id: str, data: BudgetPatch) -> BudgetView:
        budget = await self.found(budget_id)
        try:
            after, rearm = model.patched(budget, data, self._now_ms())
        except InvalidField as exc:
            raise _invalid(exc) from None
        if not await self.store.update(after, rearm):
            raise NotFound(f"budget {budget_id!r} was deleted", param="id")
        await self._refreshed()
        return (await self.viewed([after]))[0]

    async def delete(self, budget_id: str) -> None:
        if not await self.store.delete(await self.found(budget_id)):
            raise NotFound(f"no budget with _id {budget_id[:64]!r}", param="id")
        await self.outbox.forget(budget_id)
        await self._refreshed()

    async def retarget_identity(self, old: str, new: str) -> int:
        """Budgets scoped to the identity `old` (an external id) apply to `new` from now on
        (a merge); how many moved."""
        moved = 0
        while True:
            found, _ = await self.store.page(
                kind="identity",
                target=old,
                active=None,
                limit=200,
                starting_after=None,
                ending_before=None,
            )
            for budget in found:
                moved += await self.store.retarget(budget, new)
            if not found:
                break
        if moved:
            await self._refreshed()
        return moved

    async def deliveries(self, budget_id: str, limit: int) -> list[Delivery]:
        """The budget's alert deliveries, newest first."""
        await self.found(budget_id)
        return await self.outbox.log(budget_id, limit)

    async def reset(self, budget_id: str) -> BudgetView:
        budget = await self.found(budget_id)
        if not await self.store.reset(budget):
            raise NotFound(f"budget {budget_id!r} was deleted", param="id")
        await self._refreshed()
        return (await self.viewed([budget]))[0]

    async def page(
        self,
        *,
        kind: str | None = None,
        target: str | None = None,
        active: bool | None = None,
        limit: int = 25,
        starting_after: str | None = None,
        ending_before: str | None = None,
    ) -> tuple[list[BudgetView], bool]:
        for param, cursor in (("starting_after", starting_after), ("ending_before", ending_before)):
            if cursor is not None and await self.store.get(cursor) is None:
                raise InvalidRequest(f"{param}: no budget has _id {cursor[:64]!r}", param=param)
        budgets, has_more = await self.store.page(
            kind=kind,
            target=target,
            active=active,
            limit=limit,
            starting_after=starting_after,
            ending_before=ending_before,
        )
        return await self.viewed(budgets), has_more

    async def for_identities(
        self, identities: Sequence[tuple[str, Sequence[str]]]
    ) -> list[list[tuple[Budget, Used]]]:
        """Per (external id, tags): the budgets in force that apply to the identity (its own,
        its tags', and those of the key owner it is), each with its consumption."""
        await self.refresh()
        found = [[b for b, _ in self.applicable(x, tags)] for x, tags in identities]
        unique = list({b.id: b for budgets in found for b in budgets}.values())
        used = dict(
            zip(
                (b.id for b in unique),
                await self.store.consumption(unique, self._now_ms()),
                strict=True,
            )
        )
        return [[(b, used[b.id]) for b in budgets] for budgets in found]


class BudgetMover:
    """A merged identity's budgets follow its survivor (identity/merge.py)."""

    name = "budgets"

    def __init__(self, budgets: Budgets) -> None:
        self.budgets = budgets

    async def move(self, plan: MergePlan) -> None:
        await self.budgets.retarget_identity(plan.merged_x, plan.into_x)
