"""Hook reports against a real Redis: a retried report counts once."""

from __future__ import annotations

from pathlib import Path

from redis.asyncio import Redis

from tests.support.clock import FakeClock
from tests.support.usage import identities, recorder, requests_of


async def test_a_hook_report_retried_counts_once(
    redis: Redis, clock: FakeClock, tmp_path: Path
) -> None:
    ids = await identities(redis, clock, "a")
    rec = recorder(redis, clock, tmp_path)
    first = await rec.record(ids["a"], {"r": 1}, request_id="req-1", external_id="a")
    again = await rec.record(ids["a"], {"r": 1}, request_id="req-1", external_id="a")
    assert (first.counted, again.counted, again.duplicate) == (True, False, True)
    assert (await requests_of(redis, ids["a"], clock))["requests"] == 1
