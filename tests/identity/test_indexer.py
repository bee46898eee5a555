"""Building the search index: for identities listed before it existed, in the background,
one builder at a time; mending what a version without it listed."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from sidecar.identity.indexer import IndexBuilder
from tests.support.clock import FakeClock
from tests.support.search import World, check_index, make, search


@pytest.fixture
def world(redis: Redis, clock: FakeClock) -> World:
    return World(redis, clock)


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


async def test_a_build_is_followed_by_a_mend_for_what_was_listed_behind_it(
    world: World, redis: Redis
) -> None:
    await make(world, *(f"Person {n}" for n in range(7)), legacy=True)

    class Racing(IndexBuilder):
        """An older sidecar, its clock a little behind, lists while the build walks."""

        steps = 0

        async def step(self, mend: bool = False) -> tuple[str, int]:
            self.steps += 1
            if self.steps == 2:
                world.clock.advance(-6.5)  # between the first two, indexed
                await make(world, "Behind Cursor", legacy=True)
                world.clock.advance(6.5)
            return await super().step(mend)

    async def sleep(seconds: float) -> None:
        raise RuntimeError("stop")  # one round of the loop

    builder = Racing(redis, world.keys, batch=2, sleep=sleep)
    with pytest.raises(RuntimeError, match="stop"):
        await builder.keep()
    assert len(await search(world, "behind")) == 1
    await check_index(world)
