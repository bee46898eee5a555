"""The search index against a brute-force reference: random identities (non-ASCII, mixed case),
creates, updates, deletes, clocks that step back (identities reaching the index out of
creation order), the index built while all this goes on; then every search, page and cursor
agrees with a filter over the records, and the index holds exactly the postings of the
listed identities."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from sidecar.identity import ngram
from sidecar.identity.model import Profile
from sidecar.testing.redis_server import RedisServer
from tests.support.clock import FakeClock
from tests.support.search import (
    ALPHABET,
    SYLLABLES,
    TAGS,
    TEXT,
    World,
    check_index,
    index_contents,
    make,
    search,
)


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


@pytest.fixture
def world(redis: Redis, clock: FakeClock) -> World:
    return World(redis, clock)


async def test_erasure_leaves_nothing_of_the_identity_in_the_index(world: World) -> None:
    ada, grace = await make(world, "Ada Shared", "Grace Shared")
    before, slots = await index_contents(world)
    (ada_seq,) = [seq for seq, identity_id in slots.items() if identity_id == ada]
    assert any(ada_seq in seqs for seqs in before.values())
    await world.records.delete(world.known.pop(ada))
    after, slots = await index_contents(world)
    assert not any(ada_seq in seqs for seqs in after.values())
    assert ada not in slots.values()
    assert await search(world, "shared") == [grace]
    assert await search(world, "ada") == []
    directory = await world.client.zrange(world.keys.search_suffixes, 0, -1)
    assert b"ahs" in directory and b"ad\3" not in directory  # "sha" is Grace's too, "\3ad" not
    await world.records.delete(world.known.pop(grace))
    assert await world.client.zcard(world.keys.search_suffixes) == 0
    await check_index(world)


async def test_a_rename_moves_the_identity_in_the_index(world: World) -> None:
    (ada,) = await make(world, "Ada Lovelace")
    renamed = await world.records.patch(
        world.known[ada], Profile(display_name="Countess of Lovelace", email="c@ex.org")
    )
    assert renamed is not None
    world.known[ada] = renamed
    assert await search(world, "countess") == [ada]
    assert await search(world, "ada@mail") == []
    assert await search(world, "c@ex.org") == [ada]
    await check_index(world)


async def test_two_byte_needles_find_fields_that_start_end_or_are_them(world: World) -> None:
    start, end, whole, neither = await make(world, "Éa one", "one Xé", "é", "ab")
    walked = await world.listing.index.walk("+", True, "é", (), 10)
    assert walked == [whole, end, start]  # through the index
    assert await search(world, "ab") == [neither]
    assert await search(world, "xé") == [end]
    assert await world.listing.index.walk("+", True, "e", (), 10) is None  # one byte: the scan
    assert await search(world, "x") == [end]


async def test_out_of_order_arrivals_come_back_in_creation_order(world: World) -> None:
    # Created a, c (100 ms before a), b (between them), and d far back: seq order a, c, b, d.
    world.clock.advance(10)
    made = []
    for step, name in ((0, "zz a"), (-0.1, "zz c"), (0.05, "zz b"), (-30, "zz d")):
        world.clock.advance(step)
        await world.create(name, None, [], "p")
        made.append(list(world.known)[-1])
    a, c, b, d = made
    status = await world.builder.status()
    assert (status.late_ms, status.late) == (100, 1)
    newest_first = [a, b, c, d]
    for limit in (1, 2, 3, 4):
        assert await search(world, "zz", limit) == newest_first[:limit]
    assert await search(world, "zz", 2, after=b) == [c, d]
    assert await search(world, "zz", 2, before=c) == [a, b]
    assert await search(world, "zz", 1, before=d) == [c]
    await check_index(world)
