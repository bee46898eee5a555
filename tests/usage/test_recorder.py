"""The recorder against a real Redis: exactly once through timeouts, outages and restarts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import TimeoutError as RedisTimeoutError
from ulid import ULID

from sidecar.catalog import Catalog
from sidecar.identity.identify import Identifier
from sidecar.identity.listing import Listing
from sidecar.identity.model import Metrics, Profile
from sidecar.identity.records import IdentityRecords
from sidecar.store.keys import Keys
from sidecar.testing.redis_server import RedisServer
from sidecar.usage import buckets
from sidecar.usage.backlog import Backlog
from sidecar.usage.counters import UsageCounters
from sidecar.usage.ranking import Rankings
from sidecar.usage.recorder import Recorder
from sidecar.usage.spool import Spool
from sidecar.usage.writer import UsageWriter
from tests.support.clock import FakeClock

KEYS = Keys("sidecar")


class AppliedThenTimedOut:
    """A client whose next `fail` calls reach Redis, are applied, and then look like a
    socket timeout to the caller: the case where a retry must not count twice."""

    def __init__(self, client: Redis, fail: int) -> None:
        self._client = client
        self.fail = fail

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def evalsha(self, *args: Any) -> Any:
        result = await self._client.evalsha(*args)
        if self.fail:
            self.fail -= 1
            raise RedisTimeoutError("Timeout reading from socket")
        return result

    def pipeline(self, transaction: bool = False) -> Any:
        pipe = self._client.pipeline(transaction=transaction)
        execute = pipe.execute

        async def applied_then_timeout(*args: Any, **kwargs: Any) -> Any:
            result = await execute(*args, **kwargs)
            if self.fail:
                self.fail -= 1
                raise RedisTimeoutError("Timeout reading from socket")
            return result

        pipe.execute = applied_then_timeout  # type: ignore[method-assign]
        return pipe


class NoPolicies:
    def remember(self, external_id: str, tags: list[str], metadata: dict[str, Any]) -> None:
        pass


async def identities(client: Redis, clock: FakeClock, *names: str) -> dict[str, str]:
    records = IdentityRecords(client, KEYS, clock)
    return {name: (await records.upsert(name, Profile()))[0].id for name in names}


def catalog(client: Redis, clock: FakeClock) -> Catalog:
    return Catalog(
        IdentityRecords(client, KEYS, clock),
        Listing(client, KEYS),
        UsageCounters(client, KEYS, clock),
        Rankings(client, KEYS, clock),
    )


async def requests_of(client: Redis, ref: str, clock: FakeClock) -> dict[str, int]:
    found = await catalog(client, clock).get(ref, include_metrics=True)
    assert found is not None and isinstance(found.metrics, Metrics)
    return {"requests": found.metrics.total_requests, "input": found.metrics.input_tokens}


def writer_at(clock: FakeClock) -> str:
    return str(ULID.from_timestamp(clock()))


def recorder(
    client: Any,
    clock: FakeClock,
    spool_dir: Path | None,
    writer: str | None = None,
    spool_bytes: int = 1 << 24,
) -> Recorder:
    writer = writer or writer_at(clock)
    spool = Spool(spool_dir, writer, spool_bytes) if spool_dir else None
    identifier = Identifier(IdentityRecords(client, KEYS, clock), NoPolicies(), clock)
    usage = UsageWriter(client, KEYS, identifier, Rankings(client, KEYS, clock), clock)
    return Recorder(usage, Backlog(usage, spool), identifier, writer_id=writer, clock=clock)


def add(rec: Recorder, identity_id: str | None, external_id: str, n: int = 1) -> None:
    rec.add(identity_id, {"r": n, "i": 10 * n}, source="header", external_id=external_id)


@pytest.mark.parametrize("calls", [1, 3], ids=["one-entry", "pipeline"])
async def test_a_write_applied_then_timed_out_counts_once(
    redis: Redis, clock: FakeClock, tmp_path: Path, calls: int
) -> None:
    ids = await identities(redis, clock, "a", "b", "c")
    rec = recorder(AppliedThenTimedOut(redis, fail=1), clock, tmp_path)
    for name in list(ids)[:calls]:
        add(rec, ids[name], name, 2)
    await rec.drain()
    assert rec.write_errors == 1  # the first write "timed out", after Redis applied it
    for name in list(ids)[:calls]:
        assert await requests_of(redis, ids[name], clock) == {"requests": 2, "input": 20}
    assert not rec.spool or not rec.spool.pending


async def test_a_hook_report_retried_counts_once(
    redis: Redis, clock: FakeClock, tmp_path: Path
) -> None:
    ids = await identities(redis, clock, "a")
    rec = recorder(redis, clock, tmp_path)
    first = await rec.record(ids["a"], {"r": 1}, request_id="req-1", external_id="a")
    again = await rec.record(ids["a"], {"r": 1}, request_id="req-1", external_id="a")
    assert (first.counted, again.counted, again.duplicate) == (True, False, True)
    assert (await requests_of(redis, ids["a"], clock))["requests"] == 1


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis", "--appendonly", "yes")
    server.start()
    yield server
    server.kill()


@pytest.fixture
async def short_client(private_redis: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(private_redis.url, socket_timeout=0.2, socket_connect_timeout=0.2)
    yield client
    await client.aclose()


async def wait_until(check: Any, within_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


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


async def test_writer_marks_of_long_gone_processes_are_pruned(
    redis: Redis, clock: FakeClock, tmp_path: Path
) -> None:
    ids = await identities(redis, clock, "a")
    old = recorder(redis, clock, None)
    add(old, ids["a"], "a")
    await old.drain()
    days = KEYS.usage_days(ids["a"])
    assert await redis.hexists(days, f"w:{old.writer_id}")
    clock.advance(8 * buckets.DAY)  # a week and a day later, the first write of a new day
    new = recorder(redis, clock, None)
    assert new.writer_id != old.writer_id
    add(new, ids["a"], "a")
    await new.drain()
    assert not await redis.hexists(days, f"w:{old.writer_id}")
    assert await redis.hexists(days, f"w:{new.writer_id}")
