from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from sidecar.store.connect import warm
from sidecar.store.scripts import Script, load_all
from sidecar.testing.redis_server import RedisServer


def test_commands_are_packed_as_the_client_packs_them() -> None:
    from redis.asyncio.connection import Connection

    from sidecar.store.scripts import resp

    args: list[str | bytes | int] = [
        "EVALSHA",
        "abc",
        2,
        "k:{01J}:1",
        b"raw\r\nbytes",
        "r 10 60000 5 121 ",
        0,
        -3,
    ]
    (packed,) = Connection().pack_command(*args)
    assert resp(list(args)) == packed


async def test_load_all_takes_no_more_connections_than_it_is_given(
    redis_server: RedisServer,
) -> None:
    # Eight distinct scripts (one source, eight preludes), loaded three at a time.
    scripts = [Script("sidecar.identity.lua", "scan", prelude=f"-- {n}") for n in range(8)]
    admin = Redis.from_url(redis_server.url)
    client = Redis.from_url(redis_server.url)
    try:
        await admin.script_flush()
        before = await received(admin)
        assert await warm(client, 3) == 3
        await load_all(client, scripts, 3)
        assert await received(admin) - before == 3
        shas = [script.sha for script in scripts if script.sha is not None]
        assert len(set(shas)) == 8
        assert await admin.script_exists(*shas) == [True] * 8
    finally:
        await asyncio.gather(client.aclose(), admin.aclose())


async def received(admin: Redis) -> int:
    return int((await admin.info("stats"))["total_connections_received"])
