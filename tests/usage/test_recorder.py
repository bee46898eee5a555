"""The recorder against a real Redis: a retried hook report counts once; inline usage waits
to share a write, which `drain` makes at once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from redis.asyncio import Redis

from sidecar.usage import recorder as recorder_module
from tests.support.clock import FakeClock
from tests.support.usage import add, identities, recorder, requests_of


async def test_a_hook_report_retried_counts_once(
    redis: Redis, clock: FakeClock, tmp_path: Path
) -> None:
    ids = await identities(redis, clock, "a")
    rec = recorder(redis, clock, tmp_path)
    first = await rec.record(ids["a"], {"r": 1}, request_id="req-1", external_id="a")
    again = await rec.record(ids["a"], {"r": 1}, request_id="req-1", external_id="a")
    assert (first.counted, again.counted, again.duplicate) == (True, False, True)
    assert (await requests_of(redis, ids["a"], clock))["requests"] == 1


async def test_inline_usage_waits_to_share_a_write_and_drain_writes_it_at_once(
    redis: Redis, clock: FakeClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recorder_module, "FLUSH_INTERVAL", 30.0)
    ids = await identities(redis, clock, "a")
    rec = recorder(redis, clock, tmp_path)
    add(rec, ids["a"], "a")
    add(rec, ids["a"], "a", 2)
    await asyncio.sleep(0.2)
    assert (await requests_of(redis, ids["a"], clock))["requests"] == 0  # still waiting
    await asyncio.wait_for(rec.drain(), timeout=5)  # not the flusher's 30 s
    assert (await requests_of(redis, ids["a"], clock))["requests"] == 3
    assert rec.waiting == 0
    await rec.close()
