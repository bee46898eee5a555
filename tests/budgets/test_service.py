"""The budgets in force as each process holds them: which apply to a request, and how a change
made by one process reaches another (the store's generation, checked once a second)."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from redis.asyncio import Redis

from sidecar.budgets.model import BudgetCreate, BudgetPatch
from sidecar.budgets.outbox import Outbox
from sidecar.budgets.service import Budgets
from sidecar.budgets.store import BudgetStore
from sidecar.store.keys import Keys
from tests.support.clock import FakeClock


def process(redis: Redis, clock: FakeClock) -> Budgets:
    keys = Keys("sidecar")
    return Budgets(BudgetStore(redis, keys, clock), Outbox(redis, keys, clock), clock)


async def make(budgets: Budgets, kind: str, target: str, **fields: Any) -> str:
    raw = {"scope": {"kind": kind, "target": target}, "requests_per_minute": 5, **fields}
    made = await budgets.create(msgspec.convert(raw, BudgetCreate))
    return made.id


async def test_which_budgets_apply_to_a_request(redis: Redis, clock: FakeClock) -> None:
    budgets = process(redis, clock)
    ann = await make(budgets, "identity", "ann")
    team = await make(budgets, "tag", "team-a")
    other_team = await make(budgets, "tag", "team-b")
    acme = await make(budgets, "api_key_owner", "acme")
    await make(budgets, "identity", "bob")
    later = await make(budgets, "identity", "ann", expires_at="2026-11-18T12:00:00Z")

    def applying(external_id: str, tags: list[str], owner: str | None) -> set[str]:
        return {b.id for b, _ in budgets.applicable(external_id, tags, owner)}

    assert applying("ann", [], None) == {ann, later}
    assert applying("ann", ["team-a", "x"], None) == {ann, later, team}
    assert applying("ann", ["team-a", "team-b"], "acme") == {ann, later, team, other_team, acme}
    assert applying("acme", [], None) == {acme}  # the key owner itself, without its key
    assert applying("carl", [], "acme") == {acme}
    assert applying("carl", [], None) == set()
    # Expiry is read at each check, not at the next reload.
    clock.advance(3600)
    assert applying("ann", [], None) == {ann}
    subjects = budgets.subjects("carl", ["team-a"], "acme")
    assert {(s.budget, s.external_id, s.identity_id) for s in subjects} == {
        (team, "carl", team),
        (acme, "acme", acme),  # an owner's budget names the owner
    }
    assert budgets.tags == frozenset({"team-a", "team-b"})


async def test_a_change_reaches_another_process_within_a_second(
    redis: Redis, clock: FakeClock
) -> None:
    one, two = process(redis, clock), process(redis, clock)
    await two.refresh()
    loads = two.loads
    assert not await two.refresh() and two.loads == loads  # nothing changed: no reload
    assert not two.active
    watching = asyncio.create_task(two.watch(interval=0.2))
    try:
        made = await make(one, "identity", "ann")
        assert one.active  # at once where it was made
        for _ in range(50):
            if two.active:
                break
            await asyncio.sleep(0.05)
        assert [b.id for b, _ in two.applicable("ann", [], None)] == [made]
        await one.patch(made, msgspec.convert({"is_active": False}, BudgetPatch))
        for _ in range(50):
            if not two.active:
                break
            await asyncio.sleep(0.05)
        assert two.applicable("ann", [], None) == []
    finally:
        watching.cancel()
