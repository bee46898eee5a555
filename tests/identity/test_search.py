"""The search index against a brute-force reference: random identities (non-ASCII, mixed case),
creates, updates, deletes, clocks that step back (identities reaching the index out of
creation order), the index built while all this goes on; then every search, page and cursor
agrees with a filter over the records, and the index holds exactly the postings of the
listed identities."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
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
from sidecar.testing.redis_server import RedisServer
from tests.conftest import FakeClock

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


def needles(world: World) -> st.SearchStrategy[str]:
    texts = [
        t
        for x in world.known.values()
        for t in (x.external_id, x.display_name or "", x.email or "")
        if t
    ]
    pieces = st.builds(
        lambda t, a, n: t[a : a + n], st.sampled_from(texts), st.integers(0, 8), st.integers(1, 5)
    )
    return (pieces if texts else TEXT) | st.sampled_from(SYLLABLES) | st.text(ALPHABET, max_size=4)


async def check_searches(world: World, data: st.DataObject, rounds: int) -> None:
    ids = list(world.known)  # in creation order: draws do not depend on the random in _ids
    for _ in range(rounds):
        needle = data.draw(needles(world), label="needle").lower()
        tags = data.draw(st.lists(st.sampled_from(TAGS), max_size=2), label="tags")
        limit = data.draw(st.integers(1, 4), label="limit")
        cursor = data.draw(st.none() | st.sampled_from(ids) if ids else st.none(), label="cursor")
        backwards = cursor is not None and data.draw(st.booleans(), label="backwards")
        after, before = (None, cursor) if backwards else (cursor, None)
        got = await world.page(needle, tags, limit, after, before)
        assert got == world.expected(needle, tags, limit, after, before), (needle, tags)
        if await world.ready() and ngram.plan(needle, tags) is not None:
            bound = "+" if cursor is None else f"({cursor}"
            walked = await world.listing.index.walk(bound, True, needle, tags, 1)
            assert walked is not None, "the index did not answer"
    # Paging through one search from start to end gives every match once, in order.
    needle = data.draw(needles(world), label="paged needle").lower()
    everything, _ = world.expected(needle, (), 10_000, None, None)
    seen: list[str] = []
    after = None
    while True:
        page, more = await world.page(needle, (), 2, after, None)
        seen += page
        if not more:
            break
        after = page[-1]
    assert seen == everything


async def scenario(url: str, data: st.DataObject, first_seq: int, legacy: int) -> None:
    client = Redis.from_url(url)
    try:
        await client.flushall()
        world = World(client, FakeClock())
        if first_seq:  # seqs cross from one chunk to the next
            await client.hset(world.keys.search_meta, "seq", first_seq)
        for n in range(legacy):  # listed before the index existed: it has to be built
            await world.create(f"ann{n}", None, [], "old", legacy=True)
        for _ in range(data.draw(st.integers(4, 30), label="steps")):
            step = data.draw(
                st.sampled_from(
                    ["create"] * 5
                    + ["update", "update", "delete", "clock", "clock", "build", "search", "legacy"]
                ),
                label="step",
            )
            if step in ("create", "legacy"):
                local = data.draw(st.text(ALPHABET.replace(".", ""), min_size=1, max_size=5))
                email = data.draw(st.none() | st.just(f"{local}@Ex.{local}"), label="email")
                await world.create(
                    data.draw(TEXT, label="name"),
                    email,
                    data.draw(st.lists(st.sampled_from(TAGS), max_size=2, unique=True)),
                    data.draw(TEXT, label="external id"),
                    legacy=step == "legacy",
                )
            elif step in ("update", "delete") and world.known:
                target = world.known[data.draw(st.sampled_from(list(world.known)))]
                if step == "delete":
                    await world.records.delete(target)
                    del world.known[target.id]
                    continue
                change: dict[str, Any] = {}
                if data.draw(st.booleans(), label="rename"):
                    change["display_name"] = data.draw(TEXT) or None
                if data.draw(st.booleans(), label="new email"):
                    change["email"] = data.draw(st.none() | st.just("new.é@x.io"))
                if data.draw(st.booleans(), label="retag"):
                    change["tags"] = data.draw(st.lists(st.sampled_from(TAGS), unique=True))
                updated = await world.records.patch(target, Profile(**change))
                assert updated is not None
                world.known[target.id] = updated
            elif step == "clock":
                # Forward; a little back (late, within LATE_MS); far back (the late set).
                world.clock.advance(data.draw(st.sampled_from([0.002, 0.03, 1.5, -0.1, -5.0])))
            elif step == "build":
                await world.build_step()
            elif step == "search":
                if world.stale and await world.ready():
                    # Until a sidecar with the index mends it, a search does not find what
                    # a version without it listed.
                    await world.build_all()
                await check_searches(world, data, 1)
        await world.build_all()
        await check_index(world)
        await check_searches(world, data, 6)
    finally:
        await client.aclose()


@pytest.mark.slow
@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    data=st.data(),
    first_seq=st.sampled_from([0, ngram.CHUNK - 3]),
    legacy=st.sampled_from([0, 0, 3, 12]),
)
def test_search_agrees_with_a_brute_force_reference(
    redis_server: RedisServer, data: st.DataObject, first_seq: int, legacy: int
) -> None:
    """`legacy`: identities listed by a version without the index, before it starts; later
    `legacy` steps list more while it is built or ready (a rolling upgrade)."""
    asyncio.run(scenario(redis_server.url, data, first_seq, legacy))


async def arrivals(url: str, steps: list[float], deleted: list[int]) -> None:
    client = Redis.from_url(url)
    try:
        await client.flushall()
        world = World(client, FakeClock())
        await world.build_all()
        for n, step in enumerate(steps):
            world.clock.advance(step)
            await world.create(f"zz{SYLLABLES[n % len(SYLLABLES)]}", None, [TAGS[n % 2]], "id")
        for n in deleted:
            if n < len(steps):
                target = sorted(world.known)[n % len(world.known)]
                await world.records.delete(world.known.pop(target))
        await check_index(world)
        cursors: list[str | None] = [None, *sorted(world.known)]
        for needle, tags in (("zz", ()), ("zza", ()), ("zz", ("red",))):
            for limit in (1, 2, 3):
                for cursor in cursors:
                    for backwards in (False, True) if cursor else (False,):
                        after, before = (None, cursor) if backwards else (cursor, None)
                        got = await world.page(needle, tags, limit, after, before)
                        want = world.expected(needle, tags, limit, after, before)
                        assert got == want, (needle, tags, limit, after, before)
    finally:
        await client.aclose()


@pytest.mark.slow
@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(
    steps=st.lists(st.sampled_from([0.001, 0.05, 0.0, -0.01, -0.1, -0.2, -6.0]), max_size=24),
    deleted=st.lists(st.integers(0, 30), max_size=3),
)
def test_identities_indexed_out_of_creation_order_are_found_in_order(
    redis_server: RedisServer, steps: list[float], deleted: list[int]
) -> None:
    """Creates that reach the index later than newer ones (a little: `late`; far: the late
    set) still come back in _id order, from any cursor, either way."""
    asyncio.run(arrivals(redis_server.url, steps, deleted))
