"""The hot line: one pipelined connection, replies matched in order, a lost connection failing
what was in flight and reopening on the next call, and its connection given back on close."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from sidecar.errors import StoreUnavailable
from sidecar.store.hotline import HotLine
from sidecar.store.scripts import Coalescer, Script, resp
from sidecar.testing.redis_server import RedisServer


def line_for(redis: Redis) -> HotLine:
    line = HotLine.for_client(redis)
    assert line is not None
    return line


async def test_replies_come_back_in_order_and_errors_are_values(redis: Redis) -> None:
    line = line_for(redis)
    await line.open()
    packed = b"".join(resp(["INCRBY", "n", step]) for step in range(1, 51))
    packed += resp(["HGET", "n", "f"])  # a wrong type: an error reply, not raised
    futures = line.send(packed, 51)
    replies = await asyncio.gather(*futures)
    assert replies[:50] == [sum(range(1, i + 1)) for i in range(1, 51)]
    assert isinstance(replies[50], ResponseError) and "WRONGTYPE" in str(replies[50])
    await line.aclose()


async def test_a_killed_connection_fails_what_is_in_flight_and_the_next_call_reopens(
    redis: Redis,
) -> None:
    line = line_for(redis)
    await line.open()
    (blocked,) = line.send(resp(["BLPOP", "never", 5]))  # in flight until the kill
    await asyncio.sleep(0.05)
    killed = await redis.client_kill_filter(_type="normal", skipme=True)
    assert killed >= 1
    with pytest.raises(RedisConnectionError):
        await asyncio.wait_for(blocked, 2)
    assert not line.ready
    await line.open()
    (again,) = line.send(resp(["PING"]))
    assert await again == b"PONG"
    await line.aclose()


async def test_a_script_the_server_lost_is_loaded_again(redis: Redis) -> None:
    script = Script("sidecar.quota.lua", "release")
    calls = Coalescer(redis, script, line_for(redis))
    assert await calls(["bucket"], [1, "request"]) is not None
    await redis.script_flush()
    assert await calls(["bucket"], [1, "request"]) is not None  # NOSCRIPT, loaded, sent again
    assert calls.line is not None
    await calls.line.aclose()


async def test_a_stopped_server_is_store_unavailable(redis_server: RedisServer) -> None:
    client = Redis.from_url(redis_server.url, socket_connect_timeout=0.5)
    script = Script("sidecar.quota.lua", "release")
    line = line_for(client)
    calls = Coalescer(client, script, line)
    await calls(["bucket"], [1, "request"])
    line.close(RedisConnectionError("test"))  # as a dropped connection does
    await asyncio.sleep(0)
    assert not line.ready
    assert await calls(["bucket"], [1, "request"]) is not None  # reopened on use
    await line.aclose()
    await client.aclose()
    bad = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    with pytest.raises(StoreUnavailable):
        await Coalescer(bad, script, line_for(bad))(["bucket"], [1, "request"])
    await bad.aclose()


async def test_close_gives_the_connection_back_to_the_pool(redis: Redis) -> None:
    line = line_for(redis)
    pool = redis.connection_pool
    await line.open()
    assert len(pool._in_use_connections) == 1
    await line.aclose()
    assert not pool._in_use_connections
    assert await redis.ping()


def test_no_line_for_a_cluster_or_sentinel() -> None:
    from redis.asyncio.cluster import RedisCluster

    from sidecar.store.connect import connect

    cluster = connect("redis+cluster://127.0.0.1:7000", timeout_ms=50)
    assert isinstance(cluster, RedisCluster) and HotLine.for_client(cluster) is None
    sentinel = connect("redis+sentinel://127.0.0.1:26379/main", timeout_ms=50)
    assert HotLine.for_client(sentinel) is None
    assert HotLine.for_client(connect("rediss://127.0.0.1:6380/0", timeout_ms=50)) is None
    assert HotLine.for_client(connect("unix:///tmp/redis.sock", timeout_ms=50)) is not None


async def test_calls_made_while_others_are_in_flight_go_out_together_in_order(
    redis: Redis,
) -> None:
    line = line_for(redis)
    await line.open()
    assert line._transport is not None
    writes: list[bytes] = []
    write = line._transport.write

    def counted(data: bytes) -> None:
        writes.append(bytes(data))
        write(data)

    line._transport.write = counted  # type: ignore[method-assign,assignment]
    first = line.send(resp(["INCRBY", "n", 1]))  # an idle line: written at once
    assert len(writes) == 1
    rest = [line.send(resp(["INCRBY", "n", step]))[0] for step in range(2, 31)]
    rest += line.send(resp(["GET", "n"]))
    assert len(writes) == 1  # buffered behind the call in flight ...
    await line.written()  # ... and written together at the end of this turn of the loop
    assert len(writes) == 2 and writes[1].count(b"INCRBY") == 29
    assert writes[1].endswith(resp(["GET", "n"]))
    await line.written()  # nothing buffered: at once
    replies = await asyncio.gather(*first, *rest)
    assert replies[:-1] == [sum(range(1, i + 1)) for i in range(1, 31)]
    assert replies[-1] == str(sum(range(1, 31))).encode()
    late = line.send(resp(["INCRBY", "n", 0]))  # idle again: written at once
    assert len(writes) == 3 and await late[0] == sum(range(1, 31))
    await line.aclose()


async def test_written_returns_when_the_connection_is_lost_with_calls_buffered(
    redis: Redis,
) -> None:
    line = line_for(redis)
    await line.open()
    first = line.send(resp(["PING"]))  # in flight: what follows is buffered
    buffered = line.send(resp(["PING"]))
    waiting = asyncio.ensure_future(line.written())
    line.close(RedisConnectionError("test"))  # before the end of this turn of the loop
    await asyncio.wait_for(waiting, 1)  # woken, not left waiting for a flush that never comes
    for future in (*first, *buffered):
        with pytest.raises(RedisConnectionError):
            await future
    await line.aclose()


async def test_a_cancelled_wait_for_written_leaves_the_others_waiting(redis: Redis) -> None:
    line = line_for(redis)
    await line.open()
    first = line.send(resp(["PING"]))  # in flight: what follows is buffered
    gone = asyncio.ensure_future(line.written())
    kept = asyncio.ensure_future(line.written())
    # In this order on the loop: both start waiting, one is cancelled, then the flush.
    asyncio.get_running_loop().call_soon(gone.cancel)
    rest = line.send(resp(["INCR", "n"]))
    await asyncio.wait_for(kept, 1)
    assert gone.cancelled()
    assert await first[0] == b"PONG" and await rest[0] == 1
    await line.aclose()
