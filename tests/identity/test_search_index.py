"""The search index, case by case: when it answers, what erasure and renames leave in it, how it
is built for identities listed before it existed, and the order of identities that reached it
out of creation order."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from sidecar.identity.indexer import IndexBuilder
from sidecar.identity.model import Profile
from tests.conftest import FakeClock
from tests.identity.test_search import World, check_index, index_contents


@pytest.fixture
def world(redis: Redis, clock: FakeClock) -> World:
    return World(redis, clock)


async def make(world: World, *names: str, legacy: bool = False) -> list[str]:
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


async def test_an_empty_store_has_no_index_and_its_first_identity_starts_one(
    world: World,
) -> None:
    assert await world.client.dbsize() == 0
    assert (await world.builder.status()).state == "absent"
    (first,) = await make(world, "Ada Lovelace")
    status = await world.builder.status()
    assert (status.state, status.identities, status.indexed) == ("ready", 1, 1)
    assert await world.listing.index.walk("+", True, "lovelace", (), 5) == [first]


async def test_a_search_reads_the_list_until_the_index_is_built(world: World) -> None:
    ada, grace, alan = await make(world, "Ada Lovelace", "Grace Hopper", "Alan Turing", legacy=True)
    assert (await world.builder.status()).state == "absent"
    assert await world.listing.index.walk("+", True, "ace", (), 5) is None  # not built: scan
    assert await search(world, "ace") == [grace, ada]
    assert await world.builder.build()
    status = await world.builder.status()
    assert (status.state, status.indexed) == ("ready", 3)
    assert await world.listing.index.walk("+", True, "ace", (), 5) == [grace, ada]
    assert await search(world, "TUR") == [alan]
    await check_index(world)


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


async def test_a_sidecar_that_starts_indexes_what_an_older_version_listed(
    world: World, redis: Redis
) -> None:
    (ada,) = await make(world, "Ada Lovelace")  # the index exists ...
    (grace,) = await make(world, "Grace Lovelace", legacy=True)  # ... an older sidecar lists
    assert await search(world, "lovelace") == [ada]  # not in the index yet
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        raise RuntimeError("stop")  # one round of the loop

    with pytest.raises(RuntimeError, match="stop"):
        await IndexBuilder(redis, world.keys, sleep=sleep).keep()
    assert await search(world, "lovelace") == [grace, ada]
    await check_index(world)


async def test_one_builder_at_a_time(world: World, redis: Redis) -> None:
    await make(world, *(f"Person {n}" for n in range(7)), legacy=True)
    first, second = IndexBuilder(redis, world.keys, batch=2), IndexBuilder(redis, world.keys)
    assert await first.lock()
    assert (await first.step())[0] == "building"
    assert not await second.build()  # the lock is the first's
    assert (await second.status()).state == "building"
    while (await first.step())[0] != "ready":
        pass
    assert await second.build(mend=True)  # released once done
    await check_index(world)
