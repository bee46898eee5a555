from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import TimeoutError as RedisTimeoutError

from sidecar.usage import buckets
from tests.support.clock import FakeClock
from tests.support.usage import KEYS, PatchedPool, add, identities, recorder, requests_of


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

    @property
    def connection_pool(self) -> Any:
        """Its connections' first read after a batch was written times out."""

        def timing_out(conn: Any) -> dict[str, Any]:
            read = type(conn).read_response

            async def read_response(*args: Any, **kwargs: Any) -> Any:
                if self.fail:
                    self.fail -= 1
                    raise RedisTimeoutError("Timeout reading from socket")
                return await read(conn, *args, **kwargs)

            return {"read_response": read_response}

        return PatchedPool(self._client.connection_pool, timing_out)


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


@pytest.mark.parametrize("calls", [1, 3], ids=["one-entry", "batch"])
async def test_writes_on_the_line_cut_off_after_redis_applied_them_count_once(
    redis: Redis, clock: FakeClock, tmp_path: Path, calls: int
) -> None:
    ids = await identities(redis, clock, "a", "b", "c")
    rec = recorder(redis, clock, tmp_path)
    line = rec.writer.line
    assert line is not None  # a single server: the writes go on the writer's own line
    received = line._received

    def cut_off(data: bytes) -> None:
        """The first replies never arrive: the connection drops once Redis has applied the
        writes and answered."""
        line._received = received  # type: ignore[method-assign]
        assert line._transport is not None
        line._transport.abort()

    line._received = cut_off  # type: ignore[method-assign]
    for name in list(ids)[:calls]:
        add(rec, ids[name], name, 2)
    await rec.drain()
    assert rec.write_errors == 1  # failed with the connection, after Redis applied it
    for name in list(ids)[:calls]:
        assert await requests_of(redis, ids[name], clock) == {"requests": 2, "input": 20}
    assert rec.spool is not None and not rec.spool.pending
    await rec.close()
    assert not line.ready  # its connection given back at shutdown


async def test_a_script_lost_by_the_server_is_loaded_again_on_the_line(
    redis: Redis, clock: FakeClock, tmp_path: Path
) -> None:
    ids = await identities(redis, clock, "a")
    rec = recorder(redis, clock, tmp_path)
    add(rec, ids["a"], "a")
    await rec.drain()
    await redis.script_flush()  # as a restarted server would have lost it
    add(rec, ids["a"], "a", 2)
    await rec.drain()
    assert rec.write_errors == 0
    assert await requests_of(redis, ids["a"], clock) == {"requests": 3, "input": 30}
    await rec.close()


async def test_charges_for_another_id_than_the_one_written_are_dropped(
    redis: Redis, clock: FakeClock, tmp_path: Path
) -> None:
    """A report spooled with charges for the _id the process knew, written under the _id the
    identity has by then (erased and made again): the old _id's buckets are in another cluster
    slot, where the script could not reach them; they are dropped, the counters written."""
    ids = await identities(redis, clock, "a")
    rec = recorder(redis, clock, tmp_path)
    stale = KEYS.limit("01STALE0000000000000000000", "t:60") + "1"
    mine = KEYS.limit(ids["a"], "t:60") + "1"
    recorded = await rec.record(
        ids["a"],
        {"r": 1, "i": 10},
        request_id="req-1",
        charges={stale: (5, 120), mine: (7, 120)},
        external_id="a",
    )
    assert recorded.counted
    assert (await redis.get(mine), await redis.get(stale)) == (b"7", None)
    assert await requests_of(redis, ids["a"], clock) == {"requests": 1, "input": 10}
