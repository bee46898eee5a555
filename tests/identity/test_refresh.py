"""Known identities' body profiles written again (Identifier.refresh_later / refresh_due),
against a real Redis: together, once due; what failed is due again; a record gone is written
anew."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis

from sidecar.errors import StoreUnavailable
from sidecar.identity import identify
from sidecar.identity.identify import PROFILE_REFRESH_S, Identifier
from sidecar.identity.model import Profile
from sidecar.identity.records import IdentityRecords
from sidecar.identity.resolve import Resolved, Source
from tests.support.clock import FakeClock
from tests.support.usage import KEYS, NoPolicies


@pytest.fixture(autouse=True)
def no_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(identify, "REFRESH_DELAY_S", 0.0)


def body(external_id: str, name: str) -> Resolved:
    return Resolved(external_id, Source.BODY, Profile(display_name=name))


async def known_pair(redis: Redis, clock: FakeClock) -> Identifier:
    identifier = Identifier(IdentityRecords(redis, KEYS, clock), NoPolicies(), clock)
    for who in ("ann", "bob"):
        await identifier.identify(body(who, who.title()))
    clock.advance(PROFILE_REFRESH_S)
    return identifier


async def names(identifier: Identifier, *who: str) -> list[str | None]:
    found = [await identifier.records.get(w) for w in who]
    return [f.display_name if f is not None else None for f in found]


async def test_profiles_due_are_written_together_and_not_again_until_due(
    redis: Redis, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    identifier = await known_pair(redis, clock)
    records = identifier.records
    calls: list[int] = []
    update_known = records.update_known

    async def counted(updates: list[tuple[str, str, Profile]]) -> Any:
        calls.append(len(updates))
        return await update_known(updates)

    monkeypatch.setattr(records, "update_known", counted)
    ann, bob = body("ann", "Ann B."), body("bob", "Bob B.")
    assert identifier.stale(ann) and identifier.stale(bob)
    assert identifier.refresh_later(ann) is True  # the first: its caller writes them
    assert identifier.refresh_later(bob) is False
    assert identifier.refresh_later(body("ann", "Ann C.")) is False  # the latest wins
    await identifier.refresh_due()
    assert calls == [2]
    assert await names(identifier, "ann", "bob") == ["Ann C.", "Bob B."]
    assert not identifier.stale(body("ann", "Ann C.")) and not identifier.stale(bob)


async def test_profiles_not_written_stay_due(
    redis: Redis, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    identifier = await known_pair(redis, clock)

    async def unreachable(updates: list[tuple[str, str, Profile]]) -> Any:
        raise StoreUnavailable("the store did not answer")

    monkeypatch.setattr(identifier.records, "update_known", unreachable)
    ann = body("ann", "Ann B.")
    identifier.refresh_later(ann)
    with pytest.raises(StoreUnavailable):
        await identifier.refresh_due()
    assert identifier.stale(ann)  # its next request queues it again
    assert await names(identifier, "ann") == ["Ann"]


async def test_a_profile_due_whose_record_is_gone_is_written_anew(
    redis: Redis, clock: FakeClock
) -> None:
    identifier = await known_pair(redis, clock)
    gone = await identifier.records.get("bob")
    assert gone is not None
    await redis.delete(KEYS.identity(gone.id))  # evicted, or lost to a crash
    identifier.refresh_later(body("ann", "Ann B."))
    identifier.refresh_later(body("bob", "Bob B."))
    await identifier.refresh_due()
    assert await names(identifier, "ann", "bob") == ["Ann B.", "Bob B."]
    again = await identifier.records.get("bob")
    assert again is not None and again.id != gone.id
