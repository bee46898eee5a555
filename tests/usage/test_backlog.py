from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import TimeoutError as RedisTimeoutError
from ulid import ULID

from sidecar.testing.redis_server import RedisServer
from sidecar.usage.recorder import Recorder
from tests.support.clock import FakeClock
from tests.support.redis import own_redis, quick_client
from tests.support.usage import KEYS, add, identities, recorder, requests_of


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    async with own_redis(tmp_path, "--appendonly", "yes") as server:
        yield server


@pytest.fixture
async def short_client(private_redis: RedisServer) -> AsyncIterator[Redis]:
    async with quick_client(private_redis, 0.2) as client:
        yield client


async def wait_until(check: Any, within_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_usage_waits_in_the_spool_while_redis_is_paused(
    private_redis: RedisServer, short_client: Redis, clock: FakeClock, tmp_path: Path
) -> None:
    ids = await identities(short_client, clock, "a")
    rec = recorder(short_client, clock, tmp_path / "spool")
    add(rec, ids["a"], "a")
    await rec.drain()
    private_redis.pause()
    try:
        for _ in range(5):
            add(rec, ids["a"], "a")
            add(rec, None, "new-during-outage")  # whose _id nobody could look up
            await asyncio.sleep(0.1)

        async def spooled() -> bool:
            return rec.waiting == 0 and rec.spool is not None and rec.spool.pending

        await wait_until(spooled)  # on disk, nothing left in memory only
        await paused(private_redis, ids["a"])  # Redis is still paused
    finally:
        private_redis.resume()
    await wait_until(lambda: _done(rec))
    assert await requests_of(short_client, ids["a"], clock) == {"requests": 6, "input": 60}
    # Created when its usage was written, and counted.
    assert await requests_of(short_client, "new-during-outage", clock) == {
        "requests": 5,
        "input": 50,
    }
    assert await _no_files(tmp_path / "spool")  # replayed files are deleted


async def paused(server: RedisServer, identity_id: str) -> None:
    """A command to a paused server times out (shows the pause is real)."""
    client = Redis.from_url(server.url, socket_timeout=0.1)
    try:
        await client.hget(KEYS.usage_days(identity_id), "s:r")
    except RedisTimeoutError:
        return
    finally:
        await client.aclose()
    raise AssertionError("Redis answered while paused")


async def _done(rec: Recorder) -> bool:
    return rec.waiting == 0 and not (rec.spool and rec.spool.pending)


async def test_a_restarted_process_replays_what_a_dead_one_left(
    private_redis: RedisServer, short_client: Redis, clock: FakeClock, tmp_path: Path
) -> None:
    ids = await identities(short_client, clock, "a")
    private_redis.crash()  # SIGKILL: Redis is gone
    spool_dir = tmp_path / "spool"
    first = recorder(short_client, clock, spool_dir)
    for _ in range(3):
        add(first, ids["a"], "a")
    await first.close(grace_s=1.0)  # shutting down with Redis down: kept on disk
    assert first.dropped == 0
    (left,) = list(spool_dir.iterdir())
    kept = left.read_bytes()
    assert kept.count(b"\n") == 1  # one identity-hour: the three requests summed
    private_redis.start()  # from its append-only file, on the same port
    await wait_until(lambda: _ping(short_client))
    assert await requests_of(short_client, ids["a"], clock) == {"requests": 0, "input": 0}
    clock.advance(1)
    second = recorder(short_client, clock, spool_dir)
    second.start()
    await wait_until(lambda: _no_files(spool_dir))
    await second.drain()
    assert await requests_of(short_client, ids["a"], clock) == {"requests": 3, "input": 30}
    await second.close()
    # The same file replayed again (a crash after the writes, before the delete): no change.
    (spool_dir / left.name).write_bytes(kept)
    third = recorder(short_client, clock, spool_dir, writer=str(ULID()))
    third.start()
    await wait_until(lambda: _no_files(spool_dir))
    await third.drain()
    assert await requests_of(short_client, ids["a"], clock) == {"requests": 3, "input": 30}
    await third.close()


async def _ping(client: Redis) -> bool:
    try:
        return bool(await client.ping())
    except Exception:
        return False


async def _no_files(directory: Path) -> bool:
    return not any(p.stat().st_size for p in directory.iterdir())


async def test_the_spool_cap_drops_and_counts(
    private_redis: RedisServer, short_client: Redis, clock: FakeClock, tmp_path: Path
) -> None:
    private_redis.crash()
    spool = tmp_path / "spool"
    rec = recorder(short_client, clock, spool, spool_bytes=400)
    add(rec, str(ULID()), "first")

    async def kept() -> bool:
        return rec.spool is not None and rec.spool.pending

    await wait_until(kept)
    for n in range(20):  # more than the 400 bytes left take
        add(rec, str(ULID()), f"id{n}")
    await rec.close(grace_s=1.0)
    assert rec.dropped == 20
    (file,) = spool.iterdir()
    assert file.read_bytes().count(b"\n") == 1 and file.stat().st_size <= 400
