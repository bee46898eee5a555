"""A store with the search index and what it should hold: identities created through the
record scripts (or as a version without the index made them), a brute-force reference for
any search, and a check that the index holds exactly what the listed identities imply."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hypothesis import strategies as st
from redis.asyncio import Redis
from ulid import ULID

from sidecar.identity import ngram
from sidecar.identity.indexer import IndexBuilder
from sidecar.identity.listing import Listing
from sidecar.identity.model import Identity, Profile
from sidecar.identity.records import (
    IdentityRecords,
    _field_args,
    _identity,
    order_member,
    ulid_ms,
)
from sidecar.store.keys import Keys, xid_digest
from tests.support.clock import FakeClock

ALPHABET = "abcAB.é日ßİ-1"
# Text from a few syllables, so that searches match several identities.
SYLLABLES = ["ann", "Bob", "zoé", "日本", "ßa", "İx", "-", "a", "AN"]
TEXT = st.lists(st.sampled_from(SYLLABLES), max_size=3).map("".join)
TAGS = ["red", "blue", "green"]
# claim.lua before the search index.
LEGACY_CLAIM = """
local owner = redis.call('HGET', KEYS[1], ARGV[1])
if owner then return owner end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], 0, ARGV[3])
return ARGV[2]
"""


class World:
    """A store and what it should hold."""

    def __init__(self, client: Redis, clock: FakeClock) -> None:
        self.client = client
        self.clock = clock
        self.keys = Keys("sidecar")
        self.records = IdentityRecords(client, self.keys, clock)
        self.listing = Listing(client, self.keys)
        self.listing.index.slack = 0  # the smallest batches: every order decision is tested
        self.builder = IndexBuilder(client, self.keys, batch=3)
        self.known: dict[str, Identity] = {}
        self.made = 0
        self.locked = False
        self.stale = False  # listed by a version without the index since the last mend

    async def create(
        self, name: str, email: str | None, tags: list[str], xid: str, *, legacy: bool = False
    ) -> None:
        self.made += 1
        profile = Profile(display_name=name or None, email=email, tags=tags)
        if legacy:
            identity = await self.legacy_create(f"{xid}{self.made}", profile)
            self.stale = True
        else:
            identity = await self.records.create(f"{xid}{self.made}", profile)
        self.known[identity.id] = identity

    async def legacy_create(self, external_id: str, profile: Profile) -> Identity:
        """What a version without the search index does: the record, then the claim."""
        candidate = str(ULID.from_timestamp(self.clock()))
        args = [int(self.clock() * 1000), "1", external_id, *_field_args(profile)]
        _, _, record = await self.records._merge(self.client, [self.keys.identity(candidate)], args)
        identity = _identity(candidate, record)
        member = order_member(identity)
        keys = [self.keys.external_ids, self.keys.order]
        owner = await self.client.eval(
            LEGACY_CLAIM, 2, *keys, xid_digest(external_id), candidate, member
        )
        assert owner.decode() == candidate
        return identity

    async def build_step(self, mend: bool = False) -> str:
        if not self.locked:
            self.locked = await self.builder.lock()
        state, _ = await self.builder.step(mend)
        assert state != "lost"
        self.locked = state == "building"  # done: the lock is released
        return state

    async def build_all(self) -> None:
        """Build the index, or mend it: then every listed identity is in it."""
        while await self.build_step(mend=True) != "ready":
            pass
        self.stale = False

    def expected(
        self, needle: str, tags: Sequence[str], limit: int, after: str | None, before: str | None
    ) -> tuple[list[str], bool]:
        def hit(identity: Identity) -> bool:
            fields = (identity.external_id, identity.display_name or "", identity.email or "")
            if needle and not any(needle in f.lower() for f in fields):
                return False
            return not tags or any(t in identity.tags for t in tags)

        matching = sorted((i for i, x in self.known.items() if hit(x)), reverse=True)
        if before is not None:
            rest = [i for i in reversed(matching) if i > before]
            return rest[:limit][::-1], len(rest) > limit
        rest = [i for i in matching if after is None or i < after]
        return rest[:limit], len(rest) > limit

    async def page(
        self, needle: str, tags: Sequence[str], limit: int, after: str | None, before: str | None
    ) -> tuple[list[str], bool]:
        return await self.listing.page(
            limit=limit, starting_after=after, ending_before=before, needle=needle, tags=tags
        )

    async def ready(self) -> bool:
        return await self.client.hget(self.keys.search_meta, "state") == b"ready"


async def index_contents(world: World) -> tuple[dict[str, set[int]], dict[int, str]]:
    """Every posting (by the gram's part of its key name) and id slot in the store."""
    postings: dict[str, set[int]] = {}
    slots: dict[int, str] = {}
    async for key in world.client.scan_iter(match=world.keys.search_postings + "*"):
        name, chunk = key.decode().removeprefix(world.keys.search_postings).split(":")
        data: Any = await world.client.get(key)
        assert data, f"empty posting string left behind: {key!r}"
        offsets = list(ngram.offsets(data))
        assert offsets == sorted(set(offsets)), f"posting string out of order: {key!r}"
        base = int(chunk) * ngram.CHUNK
        postings.setdefault(name, set()).update(base + o for o in offsets)
    async for key in world.client.scan_iter(match=world.keys.search_ids + "*"):
        base = int(key.decode().removeprefix(world.keys.search_ids)) * ngram.ID_BLOCK
        slots_data: Any = await world.client.get(key)
        for n in range(len(slots_data) // ngram.SLOT):
            slot = slots_data[n * ngram.SLOT : (n + 1) * ngram.SLOT]
            if slot.strip(b"\0"):
                slots[base + n] = slot.decode()
    return postings, slots


async def check_index(world: World) -> None:
    """The index holds exactly the listed identities' postings and ids (and the directory the
    trigrams they have), every one has a seq, and every seq outside the late set keeps the
    order invariant (ngram.py)."""
    members: list[Any] = await world.client.zrange(world.keys.order, 0, -1)
    want: dict[str, set[int]] = {}
    ids: dict[int, str] = {}
    for member in members:
        seq = ngram.member_seq(member)
        assert seq is not None, member
        ids[seq] = member[:26].decode()
        for gram in ngram.member_grams(member):
            want.setdefault(ngram.key_part(gram), set()).add(seq)
    postings, slots = await index_contents(world)
    assert postings == want
    assert slots == ids
    # The directory names exactly the trigrams that have postings, reversed.
    directory: list[Any] = await world.client.zrange(world.keys.search_suffixes, 0, -1)
    trigrams = {bytes.fromhex(name)[::-1] for name in postings if not name.startswith("t")}
    assert set(directory) == trigrams
    meta: dict[Any, Any] = await world.client.hgetall(world.keys.search_meta)
    assert int(meta[b"count"]) == len(members)
    late_set: list[Any] = await world.client.zrange(world.keys.search_late, 0, -1)
    late = {int(s) for s in late_set}
    assert late <= set(ids)
    newest = -1
    for seq in sorted(ids):
        ms = ulid_ms(ids[seq])
        if seq not in late:
            assert ms >= newest - int(meta[b"late"]), (seq, ms, newest)
        newest = max(newest, ms)


async def make(world: World, *names: str, legacy: bool = False) -> list[str]:
    """Identities with these display names (and emails from their first words), a second
    apart; their _ids."""
    made = []
    for name in names:
        world.clock.advance(1)
        email = f"{name.split()[0].lower()}@mail.org"
        await world.create(name, email, ["red"], "p", legacy=legacy)
        made.append(list(world.known)[-1])
    return made


async def search(world: World, needle: str, limit: int = 10, **cursor: str) -> list[str]:
    ids, _ = await world.page(needle.lower(), (), limit, cursor.get("after"), cursor.get("before"))
    return ids
