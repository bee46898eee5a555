from __future__ import annotations

import asyncio

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from sidecar.store.connect import warm
from sidecar.store.scripts import Script, batch, load_all
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


async def test_a_batch_answers_each_call_and_reloads_a_script_the_server_lost(
    redis: Redis,
) -> None:
    script = Script("sidecar.quota.lua", "release")  # a request's bucket, released
    await redis.set("held", 5)
    calls = [(["held"], [1, f"request-{n}"]) for n in range(3)]
    assert await batch(redis, script, calls) == [1, 1, 1]
    assert await redis.get("held") == b"2"
    await redis.script_flush()
    assert await batch(redis, script, calls[:1]) == [1]  # NOSCRIPT: loaded, sent again
    assert await redis.get("held") == b"1"
    bad = Script("sidecar.quota.lua", "release")
    bad.source = "return redis.call('INCR', KEYS[1], 'too many')"
    (error,) = await batch(redis, bad, [(["held"], [])])
    assert isinstance(error, ResponseError)  # the call's own error, as a value
    assert await redis.get("held") == b"1"
